package proc

import (
	"os"
	"strings"
	"testing"
)

const smapsSample = `55d0c0a00000-55d0c0a02000 r--p 00000000 fe:00 1234                       /usr/bin/cat
Size:                  8 kB
Rss:                   8 kB
VmFlags: rd mr mw me sd
55d0c0a02000-55d0c0a06000 r-xp 00002000 fe:00 1234                       /usr/bin/cat
VmFlags: rd ex mr mw me sd
55d0c1b6a000-55d0c1b8b000 rw-p 00000000 00:00 0                          [heap]
VmFlags: rd wr mr mw me ac sd
7f1c0a000000-7f1c0a400000 rw-s 00000000 00:01 77                         /dev/zero (deleted)
VmFlags: rd wr sh mr mw me ms sd
7f1c0b000000-7f1c0b001000 ---p 00000000 00:00 0 
VmFlags: mr mw me sd
7ffc3c6e0000-7ffc3c701000 rw-p 00000000 00:00 0                          [stack]
VmFlags: rd wr mr mw me gd ac
7ffc3c7f0000-7ffc3c7f2000 r-xp 00000000 00:00 0                          [vdso]
VmFlags: rd ex mr mw me de sd
`

func TestParseSmaps(t *testing.T) {
	ms, err := ParseSmaps([]byte(smapsSample))
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 7 {
		t.Fatalf("got %d mappings, want 7", len(ms))
	}
	cat := ms[1]
	if cat.Start != 0x55d0c0a02000 || cat.End != 0x55d0c0a06000 || !cat.Exec || cat.Write || cat.Offset != 0x2000 ||
		cat.Path != "/usr/bin/cat" || cat.Inode != 1234 || cat.Dev != Mkdev(0xfe, 0) {
		t.Errorf("text mapping parsed as %+v", cat)
	}
	shm := ms[3]
	if !shm.Shared || !shm.Deleted || shm.Path != "/dev/zero" || !shm.HasFlag("sh") {
		t.Errorf("shared anonymous mapping parsed as %+v", shm)
	}
	if ms[4].Read || ms[4].Write || ms[4].Path != "" || ms[4].IsSpecial() {
		t.Errorf("guard mapping parsed as %+v", ms[4])
	}
	if !ms[5].HasFlag("gd") || ms[5].IsSpecial() {
		t.Errorf("stack parsed as %+v", ms[5])
	}
	if !ms[6].IsSpecial() || ms[2].IsSpecial() {
		t.Error("IsSpecial wrong for [vdso] or [heap]")
	}
}

func TestParseSmapsRejectsGarbage(t *testing.T) {
	for _, bad := range []string{
		"zzzz-1000 rw-p 00000000 00:00 0\n",
		"2000-1000 rw-p 00000000 00:00 0\n",
		"1000-2000 rw 00000000 00:00 0\n",
		"1000-2000 rw-p 0000zz00 00:00 0\n",
		"1000-2000 rw-p 00000000 0000 0\n",
	} {
		if _, err := ParseSmaps([]byte(bad)); err == nil {
			t.Errorf("accepted %q", bad)
		}
	}
}

func TestParseStatWithHostileComm(t *testing.T) {
	// A comm may contain spaces and parentheses.
	line := "42 (a) b (c) S 1 42 42 0 -1 4194304 100 0 0 0 1 2 0 0 20 0 3 0 1000 1000 100 18446744073709551615 " +
		"4194304 4198400 140737488347136 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 6295552 6296000 6299648 140737488350000 " +
		"140737488350100 140737488350100 140737488351200 0\n"
	s, err := ParseStat([]byte(line))
	if err != nil {
		t.Fatal(err)
	}
	if s.Pid != 42 || s.Comm != "a) b (c" || s.State != 'S' || s.Ppid != 1 || s.NumThreads != 3 ||
		s.StartCode != 4194304 || s.StartBrk != 6299648 || s.ArgStart != 140737488350000 || s.EnvEnd != 140737488351200 {
		t.Errorf("parsed %+v", s)
	}
	if _, err := ParseStat([]byte("42 (x) S 1 2")); err == nil {
		t.Error("accepted a truncated stat")
	}
}

func TestReadOwnFiles(t *testing.T) {
	pid := os.Getpid()
	st, err := ReadStat(pid)
	if err != nil || st.Pid != pid {
		t.Fatalf("ReadStat: %+v %v", st, err)
	}
	status, err := ReadStatus(pid, 0)
	if err != nil {
		t.Fatal(err)
	}
	if status.Threads < 1 || status.Uid[0] != uint32(os.Getuid()) || len(status.NSpid) == 0 {
		t.Errorf("status %+v", status)
	}
	ms, err := ReadSmaps(pid)
	if err != nil || len(ms) == 0 {
		t.Fatalf("ReadSmaps: %d %v", len(ms), err)
	}
	f, err := os.Open("/dev/null")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := ReadFDInfo(pid, int(f.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Flags&0o2000000 == 0 {
		t.Errorf("Go opens with O_CLOEXEC, fdinfo flags %o", fi.Flags)
	}
	link, err := ReadFDLink(pid, int(f.Fd()))
	if err != nil || link != "/dev/null" {
		t.Errorf("link %q %v", link, err)
	}
}

func TestParseFDInfoEventfd(t *testing.T) {
	fi, err := ParseFDInfo([]byte("pos:\t0\nflags:\t02004002\nmnt_id:\t17\nino:\t1038\neventfd-count:                5\neventfd-id: 2\n"))
	if err != nil {
		t.Fatal(err)
	}
	if v, ok := fi.Get("eventfd-count"); !ok || strings.TrimSpace(v) != "5" || fi.Flags != 0o2004002 || fi.Ino != 1038 {
		t.Errorf("parsed %+v", fi)
	}
	if _, err := ParseFDInfo([]byte("pos: 0\n")); err == nil {
		t.Error("accepted fdinfo without flags")
	}
}

func FuzzParsers(f *testing.F) {
	f.Add([]byte(smapsSample))
	f.Add([]byte("pos:\t0\nflags:\t02\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = ParseSmaps(b)
		_, _ = ParseStat(b)
		_, _ = ParseStatus(b)
		_, _ = ParseFDInfo(b)
	})
}

func TestParseLimits(t *testing.T) {
	own, err := ReadLimits(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if len(own) != 16 {
		t.Fatalf("%d limits, want 16", len(own))
	}
	sample := "Limit                     Soft Limit           Hard Limit           Units     \n" +
		"Max cpu time              unlimited            unlimited            seconds   \n" +
		"Max file size             1024                 2048                 bytes     \n"
	l, err := ParseLimits([]byte(sample))
	if err != nil {
		t.Fatal(err)
	}
	if len(l) != 2 || l[0].Soft != Unlimited || l[1].Soft != 1024 || l[1].Max != 2048 || l[1].Resource != 1 {
		t.Errorf("parsed %+v", l)
	}
	if _, err := ParseLimits([]byte("garbage")); err == nil {
		t.Error("accepted garbage")
	}
}

// Mappings read from maps take the VmFlags of an earlier smaps read when
// nothing about them changed, and give up when something did.
func TestTakeFlags(t *testing.T) {
	earlier, err := ParseSmaps([]byte(smapsSample))
	if err != nil {
		t.Fatal(err)
	}
	// The same sample as /proc/PID/maps has it: no VmFlags.
	var lines []string
	for _, l := range strings.Split(smapsSample, "\n") {
		if isHeader(l) {
			lines = append(lines, l)
		}
	}
	plain := strings.Join(lines, "\n")
	read := func(text string) []Mapping {
		t.Helper()
		ms, err := ParseSmaps([]byte(text))
		if err != nil {
			t.Fatal(err)
		}
		return ms
	}
	ms := read(plain)
	if !TakeFlags(ms, earlier) {
		t.Fatal("unchanged mappings did not take their flags")
	}
	if !ms[5].HasFlag("gd") || !ms[3].HasFlag("sh") || len(ms[0].Flags) != 5 {
		t.Errorf("flags taken: %v", ms)
	}
	// A mapping gone since is fine; each kind of change is not.
	if !TakeFlags(read(strings.Replace(plain, lines[4]+"\n", "", 1)), earlier) {
		t.Error("a mapping removed since made it give up")
	}
	for name, change := range map[string][2]string{
		"split":      {"55d0c1b6a000-55d0c1b8b000 rw-p", "55d0c1b6a000-55d0c1b7b000 rw-p"},
		"moved":      {"7f1c0b000000-7f1c0b001000", "7f1c0c000000-7f1c0c001000"},
		"reprotect":  {"55d0c1b6a000-55d0c1b8b000 rw-p", "55d0c1b6a000-55d0c1b8b000 r--p"},
		"other file": {"00002000 fe:00 1234", "00002000 fe:00 1235"},
		"offset":     {"r-xp 00002000", "r-xp 00003000"},
		"new":        {"[heap]\n", "[heap]\n7f1c09000000-7f1c09001000 rw-p 00000000 00:00 0 \n"},
	} {
		changed := strings.Replace(plain, change[0], change[1], 1)
		if changed == plain {
			t.Fatalf("%s: the sample has no %q", name, change[0])
		}
		if TakeFlags(read(changed), earlier) {
			t.Errorf("%s: flags taken from a mapping that changed", name)
		}
	}
}
