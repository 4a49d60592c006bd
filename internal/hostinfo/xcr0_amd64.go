package hostinfo

// cpuid executes CPUID with the given leaf and subleaf.
func cpuid(leaf, subleaf uint32) (eax, ebx, ecx, edx uint32)

// xgetbv0 executes XGETBV with ECX = 0 (XCR0). The caller must have checked
// CPUID.1:ECX.OSXSAVE.
func xgetbv0() (eax, edx uint32)

// XCR0 returns the xsave state components the OS enables for user space, or
// 0 when the CPU or OS does not use XSAVE.
func XCR0() uint64 {
	_, _, ecx, _ := cpuid(1, 0)
	if ecx&(1<<27) == 0 { // OSXSAVE
		return 0
	}
	lo, hi := xgetbv0()
	return uint64(hi)<<32 | uint64(lo)
}
