package proc

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Stat holds the /proc/PID/stat fields phaul uses.
type Stat struct {
	Pid        int
	Comm       string
	State      byte
	Ppid       int
	Pgrp       int
	Session    int
	TtyNr      int
	StartCode  uint64
	EndCode    uint64
	StartStack uint64
	StartData  uint64
	EndData    uint64
	StartBrk   uint64
	ArgStart   uint64
	ArgEnd     uint64
	EnvStart   uint64
	EnvEnd     uint64
	ExitCode   int
	ExitSignal int
	NumThreads int
}

// ReadStat reads /proc/PID/stat.
func ReadStat(pid int) (*Stat, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil, fmt.Errorf("read stat of %d: %w", pid, err)
	}
	s, err := ParseStat(b)
	if err != nil {
		return nil, fmt.Errorf("parse /proc/%d/stat: %w", pid, err)
	}
	return s, nil
}

// ParseStat parses the contents of a stat file.
func ParseStat(b []byte) (*Stat, error) {
	line := strings.TrimSpace(string(b))
	open := strings.IndexByte(line, '(')
	close := strings.LastIndexByte(line, ')')
	if open < 0 || close < open {
		return nil, fmt.Errorf("no comm in %q", line)
	}
	s := &Stat{Comm: line[open+1 : close]}
	var err error
	if s.Pid, err = strconv.Atoi(strings.TrimSpace(line[:open])); err != nil {
		return nil, fmt.Errorf("bad pid in stat")
	}
	rest := strings.Fields(line[close+1:])
	// rest[0] is field 3 (state); field N is rest[N-3].
	if len(rest) < 50 {
		return nil, fmt.Errorf("stat has %d fields, want at least 52", len(rest)+2)
	}
	s.State = rest[0][0]
	num := func(field int) uint64 {
		v, e := strconv.ParseUint(rest[field-3], 10, 64)
		if e != nil {
			if iv, e2 := strconv.ParseInt(rest[field-3], 10, 64); e2 == nil {
				return uint64(iv)
			}
			err = fmt.Errorf("bad stat field %d %q", field, rest[field-3])
		}
		return v
	}
	s.Ppid = int(num(4))
	s.Pgrp = int(num(5))
	s.Session = int(num(6))
	s.TtyNr = int(num(7))
	s.NumThreads = int(num(20))
	s.StartCode = num(26)
	s.ExitSignal = int(num(38))
	s.EndCode = num(27)
	s.StartStack = num(28)
	s.StartData = num(45)
	s.EndData = num(46)
	s.StartBrk = num(47)
	s.ArgStart = num(48)
	s.ArgEnd = num(49)
	s.EnvStart = num(50)
	s.EnvEnd = num(51)
	s.ExitCode = int(num(52))
	if err != nil {
		return nil, err
	}
	return s, nil
}

// Status holds the /proc/PID/status fields phaul uses.
type Status struct {
	Name       string
	State      string
	Umask      uint32
	TracerPid  int
	Uid        [4]uint32
	Gid        [4]uint32
	Groups     []uint32
	Threads    int
	SigPnd     uint64
	ShdPnd     uint64
	SigBlk     uint64
	SigIgn     uint64
	SigCgt     uint64
	CapInh     uint64
	CapPrm     uint64
	CapEff     uint64
	CapBnd     uint64
	CapAmb     uint64
	NoNewPrivs bool
	Seccomp    int
	NSpid      []int
}

// ReadStatus reads /proc/PID/status (or /proc/PID/task/TID/status when tid
// is non-zero).
func ReadStatus(pid, tid int) (*Status, error) {
	path := fmt.Sprintf("/proc/%d/status", pid)
	if tid != 0 {
		path = fmt.Sprintf("/proc/%d/task/%d/status", pid, tid)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	s, err := ParseStatus(b)
	if err != nil {
		return nil, fmt.Errorf("parse %s: %w", path, err)
	}
	return s, nil
}

// ParseStatus parses the contents of a status file.
func ParseStatus(b []byte) (*Status, error) {
	s := &Status{}
	for _, line := range strings.Split(string(b), "\n") {
		key, val, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		val = strings.TrimSpace(val)
		var err error
		switch key {
		case "Name":
			s.Name = val
		case "State":
			s.State = val
		case "Umask":
			var v uint64
			v, err = strconv.ParseUint(val, 8, 32)
			s.Umask = uint32(v)
		case "TracerPid":
			s.TracerPid, err = strconv.Atoi(val)
		case "Threads":
			s.Threads, err = strconv.Atoi(val)
		case "Uid", "Gid":
			f := strings.Fields(val)
			if len(f) != 4 {
				return nil, fmt.Errorf("bad %s line %q", key, line)
			}
			for i := range f {
				v, e := strconv.ParseUint(f[i], 10, 32)
				if e != nil {
					return nil, fmt.Errorf("bad %s line %q", key, line)
				}
				if key == "Uid" {
					s.Uid[i] = uint32(v)
				} else {
					s.Gid[i] = uint32(v)
				}
			}
		case "Groups":
			for _, g := range strings.Fields(val) {
				v, e := strconv.ParseUint(g, 10, 32)
				if e != nil {
					return nil, fmt.Errorf("bad Groups line %q", line)
				}
				s.Groups = append(s.Groups, uint32(v))
			}
		case "SigPnd":
			s.SigPnd, err = strconv.ParseUint(val, 16, 64)
		case "ShdPnd":
			s.ShdPnd, err = strconv.ParseUint(val, 16, 64)
		case "SigBlk":
			s.SigBlk, err = strconv.ParseUint(val, 16, 64)
		case "SigIgn":
			s.SigIgn, err = strconv.ParseUint(val, 16, 64)
		case "SigCgt":
			s.SigCgt, err = strconv.ParseUint(val, 16, 64)
		case "CapInh":
			s.CapInh, err = strconv.ParseUint(val, 16, 64)
		case "CapPrm":
			s.CapPrm, err = strconv.ParseUint(val, 16, 64)
		case "CapEff":
			s.CapEff, err = strconv.ParseUint(val, 16, 64)
		case "CapBnd":
			s.CapBnd, err = strconv.ParseUint(val, 16, 64)
		case "CapAmb":
			s.CapAmb, err = strconv.ParseUint(val, 16, 64)
		case "NoNewPrivs":
			s.NoNewPrivs = val == "1"
		case "Seccomp":
			s.Seccomp, err = strconv.Atoi(val)
		case "NSpid":
			for _, p := range strings.Fields(val) {
				v, e := strconv.Atoi(p)
				if e != nil {
					return nil, fmt.Errorf("bad NSpid line %q", line)
				}
				s.NSpid = append(s.NSpid, v)
			}
		}
		if err != nil {
			return nil, fmt.Errorf("bad %s line %q", key, line)
		}
	}
	return s, nil
}
