package proc

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/phaul/phaul/internal/sys"
)

// Samples as kernel 6.18 prints them.
const (
	timerfdSample = "pos:\t0\nflags:\t02004002\nmnt_id:\t17\nino:\t1038\nclockid: 1\nticks: 3\n" +
		"settime flags: 03\nit_value: (1, 499863672)\nit_interval: (0, 100000000)\n"
	signalfdSample = "pos:\t0\nflags:\t04002\nmnt_id:\t17\nino:\t1038\nsigmask:\t0000000800000800\n"
	inotifySample  = "pos:\t0\nflags:\t04000\nmnt_id:\t17\nino:\t1038\n" +
		"inotify wd:3 ino:3c4a3 sdev:fe00000 mask:100 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:a3c4030000000000\n" +
		"inotify wd:2 ino:2e1 sdev:fe00000 mask:84000002 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:e102000000000000\n" +
		"inotify wd:7 ino:12 sdev:1500003 mask:fff ignored_mask:0\n"
	mountinfoSample = "26 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard\n" +
		"24 23 0:22 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=24683620k\n" +
		"90 26 254:0 /srv/data /mnt/with\\040space rw master:3 shared:9 - ext4 /dev/vda rw\n"
)

func mustFDInfo(t *testing.T, s string) *FDInfo {
	t.Helper()
	fi, err := ParseFDInfo([]byte(s))
	if err != nil {
		t.Fatal(err)
	}
	return fi
}

func TestParseTimerFD(t *testing.T) {
	tf, err := ParseTimerFD(mustFDInfo(t, timerfdSample))
	if err != nil {
		t.Fatal(err)
	}
	want := TimerFD{Clock: 1, Ticks: 3, SettimeFlags: 3, Value: time.Second + 499863672, Interval: 100 * time.Millisecond}
	if *tf != want {
		t.Errorf("parsed %+v, want %+v", *tf, want)
	}
	for _, bad := range []string{
		strings.Replace(timerfdSample, "clockid: 1\n", "", 1),
		strings.Replace(timerfdSample, "ticks: 3", "ticks: -3", 1),
		strings.Replace(timerfdSample, "settime flags: 03", "settime flags: 09", 1),
		strings.Replace(timerfdSample, "(1, 499863672)", "(1 499863672)", 1),
		strings.Replace(timerfdSample, "(1, 499863672)", "(1, 1000000000)", 1),
		strings.Replace(timerfdSample, "(0, 100000000)", "(99999999999999999, 0)", 1),
		strings.Replace(timerfdSample, "(0, 100000000)", "0, 100000000)", 1),
	} {
		if tf, err := ParseTimerFD(mustFDInfo(t, bad)); err == nil {
			t.Errorf("accepted %q as %+v", bad, tf)
		}
	}
}

func TestParseSignalFD(t *testing.T) {
	m, err := ParseSignalFD(mustFDInfo(t, signalfdSample))
	if err != nil {
		t.Fatal(err)
	}
	// SIGUSR2 (12) and SIGRTMIN+2 (36).
	if want := uint64(1)<<11 | uint64(1)<<35; m != want {
		t.Errorf("mask %#x, want %#x", m, want)
	}
	if _, err := ParseSignalFD(mustFDInfo(t, "flags:\t02\n")); err == nil {
		t.Error("accepted fdinfo without sigmask")
	}
	if _, err := ParseSignalFD(mustFDInfo(t, "flags:\t02\nsigmask:\tzz\n")); err == nil {
		t.Error("accepted a bad sigmask")
	}
}

func TestParseInotify(t *testing.T) {
	ws, err := ParseInotify(mustFDInfo(t, inotifySample))
	if err != nil {
		t.Fatal(err)
	}
	if len(ws) != 3 || ws[0].Wd != 2 || ws[1].Wd != 3 || ws[2].Wd != 7 {
		t.Fatalf("parsed %+v, want watches 2, 3, 7 in order", ws)
	}
	w := ws[1]
	if w.Ino != 0x3c4a3 || w.Dev != Mkdev(254, 0) || w.Mask != 0x100 || w.HandleType != 1 ||
		!bytes.Equal(w.Handle, []byte{0xa3, 0xc4, 0x03, 0, 0, 0, 0, 0}) {
		t.Errorf("watch 3 parsed as %+v", w)
	}
	if ws[0].Mask != 0x84000002 {
		t.Errorf("watch 2 mask %#x", ws[0].Mask)
	}
	if ws[2].HandleType != -1 || ws[2].Handle != nil || ws[2].Dev != Mkdev(0x15, 3) {
		t.Errorf("watch without a handle parsed as %+v", ws[2])
	}
	for _, bad := range []string{
		"flags:\t0\ninotify wd:3 ino:3c4a3 sdev:fe00000 mask:100\n",
		"flags:\t0\ninotify wd:x ino:3c4a3 sdev:fe00000 mask:100 ignored_mask:0\n",
		"flags:\t0\ninotify wd:3 ino:3c4a3 sdev:fe00000 mask:100 ignored_mask:0 fhandle-bytes:4 fhandle-type:1 f_handle:a3c4030000000000\n",
		"flags:\t0\ninotify wd:3 ino:3c4a3 sdev:fe00000 mask:100 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:a3c40300000000zz\n",
		"flags:\t0\ninotify wd:3 ino:1 sdev:0 mask:1 ignored_mask:0\ninotify wd:3 ino:2 sdev:0 mask:1 ignored_mask:0\n",
		"flags:\t0\ninotify wd:3 junk\n",
	} {
		if ws, err := ParseInotify(mustFDInfo(t, bad)); err == nil {
			t.Errorf("accepted %q as %+v", bad, ws)
		}
	}
}

func TestParseMountInfo(t *testing.T) {
	ms, err := ParseMountInfo([]byte(mountinfoSample))
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 3 {
		t.Fatalf("%d mounts", len(ms))
	}
	if m := ms[0]; m.ID != 26 || m.Dev != Mkdev(254, 0) || m.Root != "/" || m.MountPoint != "/" || m.FSType != "ext4" {
		t.Errorf("root mount parsed as %+v", m)
	}
	if m := ms[2]; m.Root != "/srv/data" || m.MountPoint != "/mnt/with space" || m.FSType != "ext4" {
		t.Errorf("bind mount parsed as %+v", m)
	}
	for _, bad := range []string{"26 1 254:0 / / rw\n", "x 1 254:0 / / rw - ext4 /dev/vda rw\n", "26 1 2540 / / rw - ext4 x rw\n"} {
		if _, err := ParseMountInfo([]byte(bad)); err == nil {
			t.Errorf("accepted %q", bad)
		}
	}
	own, err := ReadMountInfo(os.Getpid())
	if err != nil || len(own) == 0 {
		t.Fatalf("ReadMountInfo: %d mounts, %v", len(own), err)
	}
}

// TestFDKindsLive parses the fdinfo of a timerfd, a signalfd and an inotify
// instance of this process.
func TestFDKindsLive(t *testing.T) {
	pid := os.Getpid()
	tfd, err := sys.TimerfdCreate(sys.CLOCK_BOOTTIME, sys.TFD_CLOEXEC|sys.TFD_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	defer sys.Close(tfd)
	if err := sys.TimerfdSettime(tfd, 0, int64(time.Hour), int64(time.Minute)); err != nil {
		t.Fatal(err)
	}
	fi, err := ReadFDInfo(pid, tfd)
	if err != nil {
		t.Fatal(err)
	}
	tf, err := ParseTimerFD(fi)
	if err != nil {
		t.Fatal(err)
	}
	if tf.Clock != sys.CLOCK_BOOTTIME || tf.Interval != time.Minute || tf.Value <= 59*time.Minute || tf.Value > time.Hour || tf.Ticks != 0 {
		t.Errorf("timerfd parsed as %+v", tf)
	}

	sfd, err := sys.Signalfd(1<<(sys.SIGUSR2-1)|1<<(sys.SIGTERM-1), sys.SFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer sys.Close(sfd)
	if fi, err = ReadFDInfo(pid, sfd); err != nil {
		t.Fatal(err)
	}
	if m, err := ParseSignalFD(fi); err != nil || m != 1<<(sys.SIGUSR2-1)|1<<(sys.SIGTERM-1) {
		t.Errorf("signalfd mask %#x, %v", m, err)
	}

	ifd, err := sys.InotifyInit1(sys.IN_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	defer sys.Close(ifd)
	dir := t.TempDir()
	sub := filepath.Join(dir, "sub")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	wd1, err1 := sys.InotifyAddWatch(ifd, dir, sys.IN_ALL_EVENTS)
	wd2, err2 := sys.InotifyAddWatch(ifd, sub, sys.IN_DELETE_SELF|sys.IN_ONESHOT)
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	if fi, err = ReadFDInfo(pid, ifd); err != nil {
		t.Fatal(err)
	}
	ws, err := ParseInotify(fi)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(sub)
	if err != nil {
		t.Fatal(err)
	}
	if len(ws) != 2 || ws[0].Wd != wd1 || ws[1].Wd != wd2 {
		t.Fatalf("watches %+v, want %d and %d", ws, wd1, wd2)
	}
	if w := ws[1]; w.Mask != sys.IN_DELETE_SELF|sys.IN_ONESHOT || w.Ino != st.Sys().(*syscall.Stat_t).Ino || w.Dev != st.Sys().(*syscall.Stat_t).Dev {
		t.Errorf("watch on %s parsed as %+v", sub, w)
	}
}

func FuzzFDKinds(f *testing.F) {
	for _, s := range []string{timerfdSample, signalfdSample, inotifySample, mountinfoSample} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = ParseMountInfo(b)
		fi, err := ParseFDInfo(b)
		if err != nil {
			return
		}
		if tf, err := ParseTimerFD(fi); err == nil && (tf.Value < 0 || tf.Interval < 0) {
			t.Errorf("negative times %+v", tf)
		}
		_, _ = ParseSignalFD(fi)
		if ws, err := ParseInotify(fi); err == nil {
			for i, w := range ws {
				if i > 0 && ws[i-1].Wd >= w.Wd {
					t.Errorf("watches out of order: %+v", ws)
				}
				if (w.HandleType < 0) != (w.Handle == nil) {
					t.Errorf("handle type %d with %d bytes", w.HandleType, len(w.Handle))
				}
			}
		}
	})
}
