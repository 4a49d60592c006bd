package proc

import (
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"
)

// TimerFD is the state fdinfo shows of a timerfd.
type TimerFD struct {
	Clock        int
	Ticks        uint64 // expirations not read yet
	SettimeFlags uint32 // TFD_TIMER_ABSTIME, TFD_TIMER_CANCEL_ON_SET
	// Value is the time left until the next expiration (0: disarmed, or a
	// periodic timer that expired and was not read since); Interval the
	// period.
	Value, Interval time.Duration
}

// ParseTimerFD reads the timerfd lines of a parsed fdinfo:
//
//	clockid: 1
//	ticks: 0
//	settime flags: 01
//	it_value: (1, 499863672)
//	it_interval: (0, 100000000)
func ParseTimerFD(fi *FDInfo) (*TimerFD, error) {
	get := func(key string) (string, error) {
		v, ok := fi.Get(key)
		if !ok {
			return "", fmt.Errorf("timerfd fdinfo without %q", key)
		}
		return strings.TrimSpace(v), nil
	}
	var t TimerFD
	var errs []error
	field := func(key string, parse func(string) error) {
		v, err := get(key)
		if err == nil {
			if err = parse(v); err != nil {
				err = fmt.Errorf("timerfd fdinfo %s %q: %w", key, v, err)
			}
		}
		errs = append(errs, err)
	}
	field("clockid", func(v string) (err error) { t.Clock, err = strconv.Atoi(v); return })
	field("ticks", func(v string) (err error) { t.Ticks, err = strconv.ParseUint(v, 10, 64); return })
	field("settime flags", func(v string) error {
		n, err := strconv.ParseUint(v, 8, 32)
		t.SettimeFlags = uint32(n)
		return err
	})
	field("it_value", func(v string) (err error) { t.Value, err = parseTimespec(v); return })
	field("it_interval", func(v string) (err error) { t.Interval, err = parseTimespec(v); return })
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return &t, nil
}

// parseTimespec parses "(sec, nsec)".
func parseTimespec(s string) (time.Duration, error) {
	in, ok1 := strings.CutPrefix(s, "(")
	in, ok2 := strings.CutSuffix(in, ")")
	if !ok1 || !ok2 {
		return 0, errors.New("not (sec, nsec)")
	}
	secS, nsecS, ok := strings.Cut(in, ",")
	if !ok {
		return 0, errors.New("not (sec, nsec)")
	}
	sec, err1 := strconv.ParseUint(strings.TrimSpace(secS), 10, 63)
	nsec, err2 := strconv.ParseUint(strings.TrimSpace(nsecS), 10, 32)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	const maxSec = (1<<63 - 1) / int64(time.Second)
	if nsec >= uint64(time.Second) || sec > uint64(maxSec) {
		return 0, errors.New("out of range")
	}
	return time.Duration(sec)*time.Second + time.Duration(nsec), nil
}

// ParseSignalFD reads the signal mask of a signalfd ("sigmask:
// 0000000000000800", bit n-1 for signal n) from a parsed fdinfo.
func ParseSignalFD(fi *FDInfo) (uint64, error) {
	v, ok := fi.Get("sigmask")
	if !ok {
		return 0, errors.New("signalfd fdinfo without sigmask")
	}
	v = strings.TrimSpace(v)
	m, err := strconv.ParseUint(v, 16, 64)
	if err != nil {
		return 0, fmt.Errorf("signalfd sigmask %q: %w", v, err)
	}
	return m, nil
}

// InotifyWatch is one watch of an inotify instance as fdinfo shows it.
type InotifyWatch struct {
	Wd          int
	Ino         uint64
	Dev         uint64 // userspace encoding (st_dev), converted from the kernel's
	Mask        uint32
	IgnoredMask uint32
	// The watched inode's file handle, for open_by_handle_at; HandleType
	// is -1 when the kernel gave none.
	HandleType int32
	Handle     []byte
}

// ParseInotify reads the watches of an inotify instance from a parsed
// fdinfo, sorted by watch descriptor. A watch line reads
//
//	inotify wd:3 ino:3c4a3 sdev:fe00000 mask:100 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:a3c4030000000000
//
// (numbers in hex; the fhandle fields are missing where the filesystem
// cannot encode a handle).
func ParseInotify(fi *FDInfo) ([]InotifyWatch, error) {
	var ws []InotifyWatch
	seen := map[int]bool{}
	for _, kv := range fi.Extra {
		if kv[0] != "inotify wd" {
			continue
		}
		w, err := parseInotifyWatch("wd:" + kv[1])
		if err != nil {
			return nil, fmt.Errorf("inotify watch %q: %w", kv[1], err)
		}
		if seen[w.Wd] {
			return nil, fmt.Errorf("inotify watch %d listed twice", w.Wd)
		}
		seen[w.Wd] = true
		ws = append(ws, w)
	}
	sort.Slice(ws, func(i, j int) bool { return ws[i].Wd < ws[j].Wd })
	return ws, nil
}

func parseInotifyWatch(s string) (InotifyWatch, error) {
	vals := map[string]string{}
	for _, f := range strings.Fields(s) {
		k, v, ok := strings.Cut(f, ":")
		if !ok {
			return InotifyWatch{}, fmt.Errorf("field %q", f)
		}
		vals[k] = v
	}
	hexField := func(key string, bits int) (uint64, error) {
		v, ok := vals[key]
		if !ok {
			return 0, fmt.Errorf("no %s", key)
		}
		n, err := strconv.ParseUint(v, 16, bits)
		if err != nil {
			return 0, fmt.Errorf("%s: %w", key, err)
		}
		return n, nil
	}
	wd, err1 := hexField("wd", 31)
	ino, err2 := hexField("ino", 64)
	sdev, err3 := hexField("sdev", 32)
	mask, err4 := hexField("mask", 32)
	ignored, err5 := hexField("ignored_mask", 32)
	if err := errors.Join(err1, err2, err3, err4, err5); err != nil {
		return InotifyWatch{}, err
	}
	w := InotifyWatch{
		Wd: int(wd), Ino: ino, Mask: uint32(mask), IgnoredMask: uint32(ignored),
		// The kernel's dev_t: major in the top 12 bits, minor in the low 20.
		Dev:        Mkdev(sdev>>20, sdev&0xfffff),
		HandleType: -1,
	}
	if _, ok := vals["f_handle"]; ok {
		n, err1 := hexField("fhandle-bytes", 16)
		typ, err2 := hexField("fhandle-type", 32)
		h, err3 := hex.DecodeString(vals["f_handle"])
		if err := errors.Join(err1, err2, err3); err != nil {
			return InotifyWatch{}, err
		}
		if uint64(len(h)) != n {
			return InotifyWatch{}, fmt.Errorf("f_handle of %d bytes, fhandle-bytes says %d", len(h), n)
		}
		w.HandleType, w.Handle = int32(typ), h
	}
	return w, nil
}

// Mount is one line of /proc/PID/mountinfo.
type Mount struct {
	ID         int
	Dev        uint64 // userspace encoding of major:minor
	Root       string // the mount's root within its filesystem
	MountPoint string
	FSType     string
}

// ReadMountInfo reads /proc/PID/mountinfo.
func ReadMountInfo(pid int) ([]Mount, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", pid))
	if err != nil {
		return nil, fmt.Errorf("read mounts of %d: %w", pid, err)
	}
	ms, err := ParseMountInfo(b)
	if err != nil {
		return nil, fmt.Errorf("parse mounts of %d: %w", pid, err)
	}
	return ms, nil
}

// ParseMountInfo parses the contents of a mountinfo file:
//
//	26 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
func ParseMountInfo(b []byte) ([]Mount, error) {
	var ms []Mount
	for _, line := range strings.Split(string(b), "\n") {
		if strings.TrimSpace(line) == "" {
			continue
		}
		f := strings.Fields(line)
		sep := -1
		for i := 6; i < len(f); i++ {
			if f[i] == "-" {
				sep = i
				break
			}
		}
		if len(f) < 7 || sep < 0 || sep+1 >= len(f) {
			return nil, fmt.Errorf("bad mountinfo line %q", line)
		}
		id, err1 := strconv.Atoi(f[0])
		maj, min, ok := strings.Cut(f[2], ":")
		ma, err2 := strconv.ParseUint(maj, 10, 32)
		mi, err3 := strconv.ParseUint(min, 10, 32)
		if err := errors.Join(err1, err2, err3); err != nil || !ok {
			return nil, fmt.Errorf("bad mountinfo line %q", line)
		}
		ms = append(ms, Mount{ID: id, Dev: Mkdev(ma, mi), Root: unescapeOctal(f[3]),
			MountPoint: unescapeOctal(f[4]), FSType: f[sep+1]})
	}
	return ms, nil
}

// unescapeOctal undoes the \ooo escapes of space, tab, newline and
// backslash in mountinfo paths.
func unescapeOctal(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
