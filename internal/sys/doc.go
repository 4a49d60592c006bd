// Package sys is the only package of phaul that imports golang.org/x/sys/unix.
// It wraps each raw system call phaul needs in one small function that
// retries EINTR where the call is restartable and names the call in its
// error (an *os.SyscallError, so errors.Is still matches the errno).
//
// Everything here is a thin, policy-free wrapper; the meaning of the calls
// lives in the packages that use them.
package sys
