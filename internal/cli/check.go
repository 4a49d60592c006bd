package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/spf13/pflag"

	"github.com/phaul/phaul/internal/feature"
	"github.com/phaul/phaul/internal/sys"
)

func init() {
	register(&command{
		name:    "check",
		summary: "probe the kernel features phaul uses and say what follows (exit 1 if a required one is missing)",
		usage:   "[--json] [--verbose] [--feature NAME[,NAME...]]",
		flags: func(fs *pflag.FlagSet) func(context.Context, *Env, []string) error {
			var o checkOptions
			fs.BoolVar(&o.json, "json", false,
				"print the results as JSON: every feature (name, need, ok, status, detail, follows, error)\n"+
					"and, without --feature, the verdict on dump/restore and live migration")
			fs.BoolVarP(&o.verbose, "verbose", "v", false, "also print what each probe found")
			fs.StringSliceVar(&o.names, "feature", nil,
				"probe only these features; exit 1 if any of them is absent, whatever its need.\n"+
					"Without --feature, exit 1 only if a required feature is absent (or its probe failed). Names:\n"+featureNames())
			return func(_ context.Context, env *Env, args []string) error {
				if len(args) > 0 {
					return usageError("unexpected argument %q", args[0])
				}
				return runCheck(env.Stdout, o)
			}
		},
	})
}

// checkOptions are the flags of `phaul check`.
type checkOptions struct {
	json    bool
	verbose bool
	names   []string // --feature; empty for all
}

// probeFeature returns a feature's result; tests replace it.
var probeFeature = (*feature.Feature).Result

// featureNames lists the features for --help, one per line, with their need.
func featureNames() string {
	var b strings.Builder
	for _, f := range feature.Features() {
		fmt.Fprintf(&b, "  %-25s %-8s %s\n", f.Name, f.Need, f.Description)
	}
	return strings.TrimSuffix(b.String(), "\n")
}

// checkFeature is one line of the report.
type checkFeature struct {
	Name        string `json:"name"`
	Description string `json:"description"`
	Need        string `json:"need"`    // required, optional, info
	OK          bool   `json:"ok"`      // present
	Status      string `json:"status"`  // ok, absent, or error (the probe could not run)
	Detail      string `json:"detail"`  // what the probe found
	Follows     string `json:"follows"` // what this means for phaul
	Error       string `json:"error,omitempty"`
}

// checkVerdict is what the features add up to on this host.
type checkVerdict struct {
	DumpRestore     bool     `json:"dump_restore"`
	LiveMigration   bool     `json:"live_migration"`
	MissingRequired []string `json:"missing_required"`
	// DirtyTracking lists the tracker backends this host supports; "hash"
	// works everywhere.
	DirtyTracking  []string `json:"dirty_tracking"`
	TCPEstablished bool     `json:"tcp_established"`
	Summary        string   `json:"summary"`
}

// checkReport is the whole output of `phaul check`.
type checkReport struct {
	Kernel   string         `json:"kernel"`
	Features []checkFeature `json:"features"`
	Verdict  *checkVerdict  `json:"verdict,omitempty"` // only when every feature was probed
}

func runCheck(w io.Writer, o checkOptions) error {
	fs := feature.Features()
	if len(o.names) > 0 {
		fs = nil
		for _, n := range o.names {
			f, ok := feature.Lookup(n)
			if !ok {
				return usageError("unknown feature %q (see `phaul check --help`)", n)
			}
			fs = append(fs, f)
		}
	}
	rep := checkReport{Kernel: sys.KernelRelease()}
	for _, f := range fs {
		rep.Features = append(rep.Features, describeFeature(f, probeFeature(f)))
	}
	if len(o.names) == 0 {
		rep.Verdict = sumUpCheck(rep.Features)
	}

	var err error
	if o.json {
		err = printJSON(w, rep)
	} else {
		err = printCheck(w, rep, o.verbose)
	}
	if err != nil {
		return err
	}

	if rep.Verdict != nil {
		if len(rep.Verdict.MissingRequired) > 0 {
			return fmt.Errorf("required kernel features missing: %s", strings.Join(rep.Verdict.MissingRequired, ", "))
		}
		return nil
	}
	var absent []string
	for _, c := range rep.Features {
		if !c.OK {
			absent = append(absent, c.Name)
		}
	}
	if len(absent) > 0 {
		return fmt.Errorf("not available: %s", strings.Join(absent, ", "))
	}
	return nil
}

// describeFeature turns a probe result into a report line.
func describeFeature(f *feature.Feature, r feature.Result) checkFeature {
	c := checkFeature{
		Name:        f.Name,
		Description: f.Description,
		Need:        f.Need.String(),
		OK:          r.OK,
		Detail:      r.Detail,
	}
	switch {
	case r.OK:
		c.Status = "ok"
		c.Follows = f.Present
		if c.Follows == "" { // informational: the finding is the point
			c.Follows = r.Detail
		}
	case errors.Is(r.Err, feature.ErrNotSupported):
		c.Status = "absent"
		c.Follows = f.Absent
	default:
		c.Status = "error"
		c.Follows = "unknown: the probe could not run"
	}
	if r.Err != nil {
		c.Error = r.Err.Error()
	}
	return c
}

// sumUpCheck sums up a full report.
func sumUpCheck(cs []checkFeature) *checkVerdict {
	ok := map[string]bool{}
	v := &checkVerdict{MissingRequired: []string{}}
	for _, c := range cs {
		ok[c.Name] = c.OK
		if c.Need == feature.Required.String() && !c.OK {
			v.MissingRequired = append(v.MissingRequired, c.Name)
		}
	}
	v.DumpRestore = len(v.MissingRequired) == 0
	v.LiveMigration = v.DumpRestore // dirty tracking falls back to hashing
	if ok[feature.NameSoftDirty] {
		v.DirtyTracking = append(v.DirtyTracking, "soft-dirty")
	}
	if ok[feature.NameUffdWPAsync] && ok[feature.NamePagemapScan] {
		v.DirtyTracking = append(v.DirtyTracking, "uffd-wp")
	}
	v.DirtyTracking = append(v.DirtyTracking, "hash")
	v.TCPEstablished = ok[feature.NameTCPRepair]

	if !v.DumpRestore {
		v.Summary = fmt.Sprintf("dump/restore: no (missing %s); live migration: no",
			strings.Join(v.MissingRequired, ", "))
		return v
	}
	tracking := strings.Join(v.DirtyTracking[:len(v.DirtyTracking)-1], " or ")
	if tracking == "" {
		tracking = "content hashes only, rounds cost CPU"
	}
	tcp := "established TCP connections move too"
	if !v.TCPEstablished {
		tcp = "established TCP connections cannot move"
	}
	v.Summary = fmt.Sprintf("dump/restore: yes; live migration: yes (dirty tracking: %s; %s)", tracking, tcp)
	return v
}

// printCheck writes the report as a table, the verdict on the last line.
func printCheck(w io.Writer, rep checkReport, verbose bool) error {
	fmt.Fprintf(w, "kernel %s\n", rep.Kernel)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "FEATURE\tSTATUS\tNEED\tWHAT FOLLOWS")
	for _, c := range rep.Features {
		follows := c.Follows
		if !c.OK {
			follows += " [" + c.Detail + "]"
			if c.Status == "error" {
				follows = c.Follows + " [" + c.Error + "]"
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", c.Name, c.Status, c.Need, follows)
		if verbose && c.OK && c.Detail != c.Follows {
			fmt.Fprintf(tw, "\t\t\t  found: %s\n", c.Detail)
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if rep.Verdict != nil {
		_, err := fmt.Fprintln(w, rep.Verdict.Summary)
		return err
	}
	return nil
}
