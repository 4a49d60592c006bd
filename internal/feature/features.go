package feature

import "fmt"

// Feature names, as `phaul check --feature` accepts them.
const (
	NamePtraceSeize     = "ptrace-seize"
	NameProcessVM       = "process-vm"
	NameClone3SetTid    = "clone3-set-tid"
	NamePRSetMMMap      = "pr-set-mm-map"
	NameRseqConfig      = "rseq-config"
	NameVDSOLayout      = "vdso-layout"
	NamePidfdGetfd      = "pidfd-getfd"
	NameSoftDirty       = "soft-dirty"
	NameUffdWPAsync     = "uffd-wp-async"
	NamePagemapScan     = "pagemap-scan"
	NameTCPRepair       = "tcp-repair"
	NameMemfdCreate     = "memfd-create"
	NameUnprivilegedUFD = "unprivileged-userfaultfd"
	NamePidMax          = "pid-max"
)

var (
	ptraceSeize = newFeature(NamePtraceSeize,
		"PTRACE_SEIZE + PTRACE_INTERRUPT of a child",
		Required,
		"processes can be frozen and inspected",
		"phaul cannot freeze or inspect a process: no dump, no migration",
		probePtraceSeize)
	processVM = newFeature(NameProcessVM,
		"process_vm_readv/process_vm_writev on a child",
		Required,
		"memory is copied in bulk, also while the process runs",
		"memory cannot be copied in bulk: no dump, no restore",
		probeProcessVM)
	clone3SetTid = newFeature(NameClone3SetTid,
		"clone3 with set_tid (chosen PIDs and TIDs)",
		Required,
		"restored processes and threads keep their PIDs",
		"restored processes cannot get their PIDs back: no restore",
		probeClone3SetTid)
	prSetMMMap = newFeature(NamePRSetMMMap,
		"prctl(PR_SET_MM, PR_SET_MM_MAP): set a process's mm layout at once",
		Required,
		"brk, arguments, environment, auxv and exe link are restored",
		"the mm layout of a restored process cannot be set: no restore",
		probePRSetMMMap)
	rseqConfig = newFeature(NameRseqConfig,
		"PTRACE_GET_RSEQ_CONFIGURATION on a seized child",
		Optional,
		"rseq registrations are dumped and re-registered on restore",
		"rseq registrations cannot be read: threads using rseq (glibc >= 2.35) are restored without it",
		probeRseqConfig)
	vdsoLayout = newFeature(NameVDSOLayout,
		"layout of [vvar], [vvar_vclock] and [vdso] in /proc/self/maps",
		Required,
		"the vdso of a restored process is moved to where it was",
		"the vdso cannot be placed for a restored process: no restore",
		probeVDSOLayout)
	pidfdGetfd = newFeature(NamePidfdGetfd,
		"pidfd_open + pidfd_getfd of a child's descriptor",
		Required,
		"descriptors are taken out of the target process",
		"descriptors cannot be taken out of the target: no dump",
		probePidfdGetfd)
	softDirty = newFeature(NameSoftDirty,
		"soft-dirty page bits: clear_refs=4, pagemap bit 55",
		Optional,
		"dirty tracking can use soft-dirty bits",
		"dirty tracking uses userfaultfd write-protect, or content hashes without it",
		probeSoftDirty)
	uffdWPAsync = newFeature(NameUffdWPAsync,
		"userfaultfd with UFFD_FEATURE_WP_ASYNC|WP_UNPOPULATED, WP registration",
		Optional,
		"dirty tracking can use userfaultfd write-protect (with pagemap-scan)",
		"no write-protect dirty tracking: soft-dirty or content hashes",
		probeUffdWPAsync)
	pagemapScan = newFeature(NamePagemapScan,
		"PAGEMAP_SCAN ioctl on /proc/self/pagemap",
		Optional,
		"dirty and present pages are found with one ioctl per range",
		"no PAGEMAP_SCAN: write-protect dirty tracking is unavailable",
		probePagemapScan)
	tcpRepair = newFeature(NameTCPRepair,
		"TCP_REPAIR on an established loopback connection",
		Optional,
		"established TCP connections can move (--tcp-established)",
		"established TCP connections cannot move with the process",
		probeTCPRepair)
	memfdCreate = newFeature(NameMemfdCreate,
		"memfd_create",
		Optional,
		"memfd and shared anonymous memory can be recreated on restore",
		"memfd and shared anonymous mappings cannot be restored",
		probeMemfdCreate)
	unprivilegedUFD = newFeature(NameUnprivilegedUFD,
		"vm.unprivileged_userfaultfd sysctl",
		Info,
		"",
		"no userfaultfd sysctl: the kernel lacks userfaultfd or predates 5.2",
		probeUnprivilegedUserfaultfd)
	pidMax = newFeature(NamePidMax,
		"kernel.pid_max sysctl",
		Info,
		"",
		"pid_max unknown: restored PIDs cannot be checked against it",
		probePidMax)
)

// features lists every feature in the order `phaul check` prints them.
var features = []*Feature{
	ptraceSeize, processVM, clone3SetTid, prSetMMMap, rseqConfig, vdsoLayout,
	pidfdGetfd, softDirty, uffdWPAsync, pagemapScan, tcpRepair, memfdCreate,
	unprivilegedUFD, pidMax, timerfdSetTicks,
}

// Features returns every feature phaul probes, in a fixed order.
func Features() []*Feature { return append([]*Feature(nil), features...) }

// Lookup returns the feature called name.
func Lookup(name string) (*Feature, bool) {
	for _, f := range features {
		if f.Name == name {
			return f, true
		}
	}
	return nil, false
}

// Check probes the feature called name (see Feature.Probe); an unknown name
// gives an error matching ErrUnknown.
func Check(name string) error {
	f, ok := Lookup(name)
	if !ok {
		return fmt.Errorf("%w %q", ErrUnknown, name)
	}
	return f.Probe()
}

// All probes every feature (each at most once per process) and returns the
// results in the order of Features.
func All() []Result {
	rs := make([]Result, len(features))
	for i, f := range features {
		rs[i] = f.Result()
	}
	return rs
}

// PtraceSeize probes PTRACE_SEIZE and PTRACE_INTERRUPT on a child.
func PtraceSeize() error { return ptraceSeize.Probe() }

// ProcessVM probes process_vm_readv and process_vm_writev on a child.
func ProcessVM() error { return processVM.Probe() }

// Clone3SetTid probes clone3 and its set_tid argument.
func Clone3SetTid() error { return clone3SetTid.Probe() }

// PRSetMMMap probes prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE).
func PRSetMMMap() error { return prSetMMMap.Probe() }

// RseqConfig probes PTRACE_GET_RSEQ_CONFIGURATION on a seized child.
func RseqConfig() error { return rseqConfig.Probe() }

// VDSO probes the vdso layout of this process; CurrentVDSOLayout returns it.
func VDSO() error { return vdsoLayout.Probe() }

// PidfdGetfd probes pidfd_open and pidfd_getfd on a child.
func PidfdGetfd() error { return pidfdGetfd.Probe() }

// SoftDirty probes soft-dirty tracking (clear_refs=4, pagemap bit 55).
func SoftDirty() error { return softDirty.Probe() }

// UffdWPAsync probes userfaultfd with asynchronous write-protect.
func UffdWPAsync() error { return uffdWPAsync.Probe() }

// PagemapScan probes the PAGEMAP_SCAN ioctl.
func PagemapScan() error { return pagemapScan.Probe() }

// TCPRepair probes TCP_REPAIR on an established loopback connection.
func TCPRepair() error { return tcpRepair.Probe() }

// MemfdCreate probes memfd_create.
func MemfdCreate() error { return memfdCreate.Probe() }

// UnprivilegedUserfaultfd reads the vm.unprivileged_userfaultfd sysctl
// (informational).
func UnprivilegedUserfaultfd() error { return unprivilegedUFD.Probe() }

// PidMax reads the kernel.pid_max sysctl (informational).
func PidMax() error { return pidMax.Probe() }
