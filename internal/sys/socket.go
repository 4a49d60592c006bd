package sys

import (
	"errors"

	"golang.org/x/sys/unix"
)

// Socket levels and TCP repair options (include/uapi/linux/tcp.h).
const (
	SOL_TCP = unix.SOL_TCP

	TCP_REPAIR       = unix.TCP_REPAIR
	TCP_REPAIR_QUEUE = unix.TCP_REPAIR_QUEUE
	TCP_QUEUE_SEQ    = unix.TCP_QUEUE_SEQ

	TCP_REPAIR_ON        = 1
	TCP_REPAIR_OFF       = unix.TCP_REPAIR_OFF
	TCP_REPAIR_OFF_NO_WP = unix.TCP_REPAIR_OFF_NO_WP

	TCP_NO_QUEUE   = 0
	TCP_RECV_QUEUE = 1
	TCP_SEND_QUEUE = 2
)

// SetsockoptInt sets an int socket option, retrying EINTR.
func SetsockoptInt(fd, level, opt, value int) error {
	for {
		err := unix.SetsockoptInt(fd, level, opt, value)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return wrap("setsockopt", err)
	}
}

// GetsockoptInt reads an int socket option.
func GetsockoptInt(fd, level, opt int) (int, error) {
	v, err := unix.GetsockoptInt(fd, level, opt)
	return v, wrap("getsockopt", err)
}
