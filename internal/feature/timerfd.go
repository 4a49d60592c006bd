package feature

import (
	"errors"
	"fmt"
	"time"

	"github.com/phaul/phaul/internal/sys"
)

// NameTimerfdSetTicks names the TFD_IOC_SET_TICKS probe.
const NameTimerfdSetTicks = "timerfd-set-ticks"

var timerfdSetTicks = newFeature(NameTimerfdSetTicks,
	"TFD_IOC_SET_TICKS ioctl on a timerfd (CONFIG_CHECKPOINT_RESTORE)",
	Optional,
	"unread timerfd expirations are restored with their count",
	"unread timerfd expirations are restored as a single one",
	probeTimerfdSetTicks)

// TimerfdSetTicks probes the TFD_IOC_SET_TICKS ioctl of timerfds.
func TimerfdSetTicks() error { return timerfdSetTicks.Probe() }

// probeTimerfdSetTicks sets the expiration count of a disarmed timerfd and
// reads it back with a non-blocking read.
func probeTimerfdSetTicks() (string, error) {
	fd, err := sys.TimerfdCreate(sys.CLOCK_MONOTONIC, sys.TFD_CLOEXEC|sys.TFD_NONBLOCK)
	if err != nil {
		return "", absent("timerfd_create refused", err)
	}
	defer sys.Close(fd)
	// Armed far away: the count can only come from the ioctl.
	if err := sys.TimerfdSettime(fd, 0, int64(time.Hour), 0); err != nil {
		return "", err
	}
	err = sys.TimerfdSetTicks(fd, 3)
	if errors.Is(err, sys.ENOTTY) {
		return "", absent("TFD_IOC_SET_TICKS unknown (kernel without CONFIG_CHECKPOINT_RESTORE)", err)
	}
	if err != nil {
		return "", absent("TFD_IOC_SET_TICKS refused", err)
	}
	b := make([]byte, 8)
	n, err := sys.Read(fd, b)
	if err != nil || n != 8 || b[0] != 3 {
		return "", absent("a timerfd does not return the count TFD_IOC_SET_TICKS set", fmt.Errorf("read %d bytes %x: %w", n, b, err))
	}
	return "set and read back a timerfd's expiration count", nil
}
