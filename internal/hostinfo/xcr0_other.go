//go:build !amd64

package hostinfo

// XCR0 returns 0: xsave is an x86 notion.
func XCR0() uint64 { return 0 }
