package feature

import (
	"errors"
	"fmt"
	"sync"
)

// ErrNotSupported is matched (errors.Is) by every error reporting a feature
// this host lacks.
var ErrNotSupported = errors.New("not supported")

// ErrUnknown is returned by Check for a name that is no feature.
var ErrUnknown = errors.New("unknown feature")

// Need says how much phaul depends on a feature.
type Need int

const (
	// Required: dump and restore cannot work without the feature.
	Required Need = iota
	// Optional: without it phaul falls back to a slower path or loses a
	// capability (for instance migrating TCP connections).
	Optional
	// Info: a fact about the host, reported for the user.
	Info
)

func (n Need) String() string {
	switch n {
	case Required:
		return "required"
	case Optional:
		return "optional"
	case Info:
		return "info"
	}
	return fmt.Sprintf("Need(%d)", int(n))
}

// NotSupportedError reports a feature this host lacks. It matches
// ErrNotSupported and the underlying error (usually an *os.SyscallError,
// hence the errno).
type NotSupportedError struct {
	Feature     string // feature name, e.g. "soft-dirty"
	Reason      string // what is missing
	Consequence string // what follows for phaul
	Err         error  // the refusal that showed it, if a call failed
}

func (e *NotSupportedError) Error() string {
	reason := e.Reason
	if e.Err != nil {
		reason += ": " + e.Err.Error()
	}
	return fmt.Sprintf("%s: absent (%s): %s", e.Feature, reason, e.Consequence)
}

// Unwrap returns ErrNotSupported and the underlying error.
func (e *NotSupportedError) Unwrap() []error {
	if e.Err == nil {
		return []error{ErrNotSupported}
	}
	return []error{ErrNotSupported, e.Err}
}

// missing is what a probe body returns for an absent feature; Feature turns
// it into a *NotSupportedError carrying the feature's name and consequence.
type missing struct {
	reason string
	err    error
}

func (m *missing) Error() string {
	if m.err == nil {
		return m.reason
	}
	return m.reason + ": " + m.err.Error()
}

// absent reports that the probed mechanism is missing; err is the refusal
// that showed it, or nil.
func absent(reason string, err error) error { return &missing{reason: reason, err: err} }

// Feature is one kernel mechanism phaul uses and its cached probe.
type Feature struct {
	Name        string
	Description string
	Need        Need
	Present     string // what follows when the feature is present
	Absent      string // what follows when it is absent

	result func() (string, error) // the probe, run once
}

// newFeature wraps probe so that it runs at most once.
func newFeature(name, desc string, need Need, present, absentText string, probe func() (string, error)) *Feature {
	f := &Feature{Name: name, Description: desc, Need: need, Present: present, Absent: absentText}
	f.result = sync.OnceValues(func() (string, error) { return f.run(probe) })
	return f
}

// run calls probe and turns its outcome into the feature's result.
func (f *Feature) run(probe func() (string, error)) (string, error) {
	detail, err := probe()
	if err == nil {
		return detail, nil
	}
	var m *missing
	if errors.As(err, &m) {
		return m.reason, &NotSupportedError{Feature: f.Name, Reason: m.reason, Consequence: f.Absent, Err: m.err}
	}
	return detail, fmt.Errorf("%s: probe failed: %w", f.Name, err)
}

// Probe returns nil when the feature is present, an error matching
// ErrNotSupported when it is absent, or another error when the probe itself
// could not run. The probe runs once per process.
func (f *Feature) Probe() error {
	_, err := f.result()
	return err
}

// Result is the outcome of one feature's probe.
type Result struct {
	Name   string
	OK     bool   // the feature is present
	Detail string // what the probe found (a measurement, or why it is absent)
	Err    error  // nil when OK
}

// Result returns the feature's (cached) probe result.
func (f *Feature) Result() Result {
	detail, err := f.result()
	return Result{Name: f.Name, OK: err == nil, Detail: detail, Err: err}
}
