/*
 * memory.c - a single-threaded workload whose self-check covers the memory
 * layout and the per-process state phaul must carry across dump/restore.
 *
 * Memory: private anonymous pages (never touched, zero-filled, patterned),
 * a MAP_PRIVATE file mapping with some pages written (copy-on-write), a
 * MAP_SHARED file mapping (checked against the file with pread), malloc'ed
 * big and small chunks, sbrk growth, a pattern in a large array on the main
 * stack, a PROT_NONE guard page, __thread data.
 * Other state: vDSO clocks, sched_getcpu/rseq, a regular file read to a known
 * offset, /dev/null and /dev/urandom descriptors, descriptor flags, umask,
 * cwd, comm, SIGUSR1/SIGUSR2/SIGTERM actions, the alternate signal stack, the
 * signal mask, and (with --usr2-at N) a process-wide pending SIGUSR2.
 *
 * --shared-writes 0 stops the main loop from writing shared.dat after setup:
 * the file is state outside the image, so a process that keeps running
 * after `dump --leave-running` must not change it if that image is to be
 * restored later.
 *
 * Build: gcc -O2 -Wall memory.c -o memory   (also with -static)
 * Protocol: see fixture.h.
 */
#include "fixture.h"

#include <sys/mman.h>

#define ANON_PAGES 2048 /* 8 MiB */
#define PRIV_PAGES 16
#define SHARED_PAGES 8
#define SMALL_N 2000
#define SMALL_STABLE 100 /* chunks below this index are never freed */
#define BIG_SIZE (3u << 20)
#define BRK_SIZE (256u << 10)
#define STACK_SIZE (256u << 10)
#define INPUT_SIZE (1u << 20)
#define TLS_WORDS 16
#define ALTSTACK_SIZE (64u << 10)
#define COMM "phaul-memory"

enum { TAG_ANON = 1, TAG_FILE, TAG_PRIV, TAG_SHARED, TAG_BIG, TAG_SMALL, TAG_BRK, TAG_STACK, TAG_TLS, TAG_GUARD };

static struct opts opt;

static uint8_t *anon;
static uint32_t anon_gen[ANON_PAGES];
static uint8_t *priv;
static uint32_t priv_gen[PRIV_PAGES]; /* 0: never written, holds the file's bytes */
static uint8_t *shared;
static uint32_t shared_gen[SHARED_PAGES];
static uint8_t *big;
static struct small {
	uint8_t *p;
	size_t len;
	uint32_t gen;
} smalls[SMALL_N];
static uint8_t *brkmem;
static uint8_t *guard; /* three pages, the middle one PROT_NONE */
static __thread uint64_t tls_words[TLS_WORDS];
static __thread uint64_t tls_magic;
static int fd_input, fd_null, fd_random;
static off_t input_off;
static char cwd0[PATH_MAX];
static int stdio_flags[3];
static struct sigaction act_usr1, act_usr2, act_term, act_trap;
static stack_t alt0;
static sigset_t mask0;
static uint64_t progress, last_progress;
static struct clockstate clk;
static int usr2_unblocked;

static volatile sig_atomic_t usr2_count;
static volatile int usr2_code, usr2_pid, usr2_onstack, usr2_maskok;

static void on_usr2(int sig, siginfo_t *si, void *uc)
{
	(void)sig;
	(void)uc;
	char here;
	usr2_count++;
	usr2_code = si->si_code;
	usr2_pid = si->si_pid;
	uintptr_t sp = (uintptr_t)&here, lo = (uintptr_t)alt0.ss_sp;
	usr2_onstack = sp >= lo && sp < lo + alt0.ss_size;
	sigset_t cur;
	sigprocmask(SIG_BLOCK, NULL, &cur);
	usr2_maskok = sigismember(&cur, SIGHUP) && sigismember(&cur, SIGWINCH) && sigismember(&cur, SIGUSR2);
}

static uint8_t input_byte(uint64_t off) { return (uint8_t)(off * 131 + (off >> 12) * 7 + 1); }

static int anon_class(int i) { return i % 4; } /* 0 untouched, 1 zero-filled, 2-3 patterned */

static void write_file(const char *name, size_t len, uint8_t (*byte)(uint64_t), uint64_t tag)
{
	int fd = open(name, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		die("create %s", name);
	static uint8_t page[PAGE];
	for (size_t off = 0; off < len; off += PAGE) {
		if (byte) {
			for (size_t j = 0; j < PAGE; j++)
				page[j] = byte(off + j);
		} else {
			fill_pattern(page, PAGE, seed3(tag, off / PAGE, 0));
		}
		if (write(fd, page, PAGE) != PAGE)
			die("write %s", name);
	}
	close(fd);
}

static void *map_file(const char *name, size_t len, int flags)
{
	int fd = open(name, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		die("open %s", name);
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, flags, fd, 0);
	if (p == MAP_FAILED)
		die("mmap %s", name);
	close(fd);
	return p;
}

/* ---- setup ----------------------------------------------------------- */

static void setup_signals(void)
{
	sigset_t m;
	sigemptyset(&m);
	sigaddset(&m, SIGUSR2);
	if (sigprocmask(SIG_SETMASK, &m, NULL))
		die("sigprocmask");

	alt0.ss_sp = mmap(NULL, ALTSTACK_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (alt0.ss_sp == MAP_FAILED)
		die("mmap altstack");
	alt0.ss_size = ALTSTACK_SIZE;
	alt0.ss_flags = 0;
	if (sigaltstack(&alt0, NULL))
		die("sigaltstack");

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	sigaddset(&sa.sa_mask, SIGALRM);
	if (sigaction(SIGUSR1, &sa, NULL))
		die("sigaction USR1");

	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_usr2;
	sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
	sigemptyset(&sa.sa_mask);
	sigaddset(&sa.sa_mask, SIGHUP);
	sigaddset(&sa.sa_mask, SIGWINCH);
	if (sigaction(SIGUSR2, &sa, NULL))
		die("sigaction USR2");

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_term;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGTERM, &sa, NULL))
		die("sigaction TERM");

	/* Ignored SIGTRAP: phaul's injected code ends with a trap, and the
	 * kernel resets an ignored disposition when a trap forces the signal. */
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = SIG_IGN;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGTRAP, &sa, NULL))
		die("sigaction TRAP");

	act_usr1 = query_action(SIGUSR1);
	act_usr2 = query_action(SIGUSR2);
	act_term = query_action(SIGTERM);
	act_trap = query_action(SIGTRAP);
	sigprocmask(SIG_BLOCK, NULL, &mask0);
}

static void setup_memory(void)
{
	anon = mmap(NULL, ANON_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (anon == MAP_FAILED)
		die("mmap anon");
	for (int i = 0; i < ANON_PAGES; i++) {
		uint8_t *p = anon + (size_t)i * PAGE;
		switch (anon_class(i)) {
		case 0:
			break;
		case 1:
			memset(p, 0, PAGE);
			break;
		default:
			anon_gen[i] = 1;
			fill_pattern(p, PAGE, seed3(TAG_ANON, i, 1));
		}
	}

	write_file("private.dat", PRIV_PAGES * PAGE, NULL, TAG_FILE);
	priv = map_file("private.dat", PRIV_PAGES * PAGE, MAP_PRIVATE);
	for (int i = 0; i < PRIV_PAGES; i += 3) {
		priv_gen[i] = 1;
		fill_pattern(priv + (size_t)i * PAGE, PAGE, seed3(TAG_PRIV, i, 1));
	}

	int fd = open("shared.dat", O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0 || ftruncate(fd, SHARED_PAGES * PAGE))
		die("create shared.dat");
	close(fd);
	shared = map_file("shared.dat", SHARED_PAGES * PAGE, MAP_SHARED);
	for (int i = 0; i < SHARED_PAGES; i++) {
		shared_gen[i] = 1;
		fill_pattern(shared + (size_t)i * PAGE, PAGE, seed3(TAG_SHARED, i, 1));
	}

	big = malloc(BIG_SIZE);
	if (!big)
		die("malloc big");
	fill_pattern(big, BIG_SIZE, seed3(TAG_BIG, 0, 0));
	for (int k = 0; k < SMALL_N; k++) {
		smalls[k].len = 16 + (mix64(k) % 1009) / 8 * 8;
		smalls[k].p = malloc(smalls[k].len);
		if (!smalls[k].p)
			die("malloc small");
		fill_pattern(smalls[k].p, smalls[k].len, seed3(TAG_SMALL, k, 0));
	}

	brkmem = sbrk(BRK_SIZE);
	if (brkmem == (void *)-1)
		die("sbrk");
	fill_pattern(brkmem, BRK_SIZE, seed3(TAG_BRK, 0, 0));

	guard = mmap(NULL, 3 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (guard == MAP_FAILED)
		die("mmap guard");
	fill_pattern(guard, PAGE, seed3(TAG_GUARD, 0, 0));
	fill_pattern(guard + 2 * PAGE, PAGE, seed3(TAG_GUARD, 2, 0));
	if (mprotect(guard + PAGE, PAGE, PROT_NONE))
		die("mprotect guard");

	tls_magic = seed3(TAG_TLS, (uint64_t)getpid(), 0);
	fill_pattern(tls_words, sizeof(tls_words), seed3(TAG_TLS, 1, 0));
}

static void setup_files(void)
{
	umask(027);
	if (prctl(PR_SET_NAME, COMM, 0, 0, 0))
		die("PR_SET_NAME");
	if (!getcwd(cwd0, sizeof(cwd0)))
		die("getcwd");

	int fd = open("input.dat", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		die("create input.dat");
	static uint8_t buf[INPUT_SIZE];
	for (uint64_t i = 0; i < INPUT_SIZE; i++)
		buf[i] = input_byte(i);
	if (write(fd, buf, INPUT_SIZE) != INPUT_SIZE)
		die("write input.dat");
	close(fd);
	fd_input = open("input.dat", O_RDONLY);
	if (fd_input < 0)
		die("open input.dat");
	uint8_t head[1000];
	if (read(fd_input, head, sizeof(head)) != sizeof(head))
		die("read input.dat");
	input_off = sizeof(head);

	fd_null = open("/dev/null", O_RDWR);
	fd_random = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
	if (fd_null < 0 || fd_random < 0)
		die("open /dev/null, /dev/urandom");
	for (int i = 0; i < 3; i++)
		stdio_flags[i] = fcntl(i, F_GETFL);
}

/* ---- checks ---------------------------------------------------------- */

static void report_bad(struct verdict *v, const char *region, long page, long off, const char *what)
{
	vfail(v, "%s: page %ld offset %ld: %s", region, page, off, what);
}

static void check_anon(struct verdict *v)
{
	int bad = 0;
	for (int i = 0; i < ANON_PAGES && bad < 3; i++) {
		uint8_t *p = anon + (size_t)i * PAGE;
		long off = anon_class(i) < 2 ? check_zero(p, PAGE) : check_pattern(p, PAGE, seed3(TAG_ANON, i, anon_gen[i]));
		if (off >= 0) {
			report_bad(v, "anon", i, off, anon_class(i) == 0 ? "never-touched page is not zero" : anon_class(i) == 1 ? "zero-filled page is not zero" : "pattern mismatch");
			bad++;
		}
	}
}

static void check_files(struct verdict *v)
{
	static uint8_t fbuf[PRIV_PAGES * PAGE];
	int fd = open("private.dat", O_RDONLY | O_CLOEXEC);
	if (fd < 0 || pread(fd, fbuf, sizeof(fbuf), 0) != (ssize_t)sizeof(fbuf)) {
		vfail(v, "priv: read private.dat: %s", strerror(errno));
	} else {
		for (int i = 0; i < PRIV_PAGES; i++) {
			long off = check_pattern(fbuf + (size_t)i * PAGE, PAGE, seed3(TAG_FILE, i, 0));
			if (off >= 0) {
				report_bad(v, "priv", i, off, "private.dat changed on disk (MAP_PRIVATE wrote back?)");
				break;
			}
		}
	}
	if (fd >= 0)
		close(fd);
	for (int i = 0; i < PRIV_PAGES; i++) {
		uint8_t *p = priv + (size_t)i * PAGE;
		long off = priv_gen[i] ? check_pattern(p, PAGE, seed3(TAG_PRIV, i, priv_gen[i]))
				       : check_pattern(p, PAGE, seed3(TAG_FILE, i, 0));
		if (off >= 0) {
			report_bad(v, "priv", i, off, priv_gen[i] ? "written page lost the program's bytes" : "unwritten page does not hold the file's bytes");
			break;
		}
	}

	static uint8_t sbuf[SHARED_PAGES * PAGE];
	fd = open("shared.dat", O_RDONLY | O_CLOEXEC);
	if (fd < 0 || pread(fd, sbuf, sizeof(sbuf), 0) != (ssize_t)sizeof(sbuf)) {
		vfail(v, "shared: read shared.dat: %s", strerror(errno));
		memset(sbuf, 0, sizeof(sbuf));
	}
	if (fd >= 0)
		close(fd);
	for (int i = 0; i < SHARED_PAGES; i++) {
		uint64_t s = seed3(TAG_SHARED, i, shared_gen[i]);
		long off = check_pattern(shared + (size_t)i * PAGE, PAGE, s);
		if (off >= 0) {
			report_bad(v, "shared", i, off, "mapping pattern mismatch");
			break;
		}
		off = check_pattern(sbuf + (size_t)i * PAGE, PAGE, s);
		if (off >= 0) {
			report_bad(v, "shared", i, off, "file content differs from the mapping (not MAP_SHARED on shared.dat?)");
			break;
		}
	}
}

static void check_heap(struct verdict *v)
{
	long off = check_pattern(big, BIG_SIZE, seed3(TAG_BIG, 0, 0));
	if (off >= 0)
		report_bad(v, "heap-big", off / PAGE, off % PAGE, "pattern mismatch");
	for (int k = 0; k < SMALL_N; k++) {
		off = check_pattern(smalls[k].p, smalls[k].len, seed3(TAG_SMALL, k, smalls[k].gen));
		if (off >= 0) {
			vfail(v, "heap-small: chunk %d (%p, %zu bytes) offset %ld: pattern mismatch", k,
			      (void *)smalls[k].p, smalls[k].len, off);
			break;
		}
	}
	off = check_pattern(brkmem, BRK_SIZE, seed3(TAG_BRK, 0, 0));
	if (off >= 0)
		report_bad(v, "brk", off / PAGE, off % PAGE, "pattern mismatch");
	uintptr_t kbrk = (uintptr_t)syscall(SYS_brk, 0);
	if (kbrk < (uintptr_t)brkmem + BRK_SIZE)
		vfail(v, "brk: kernel program break %#lx is below the sbrk'ed region end %#lx",
		      (unsigned long)kbrk, (unsigned long)((uintptr_t)brkmem + BRK_SIZE));
}

static void check_guard(struct verdict *v)
{
	long off = check_pattern(guard, PAGE, seed3(TAG_GUARD, 0, 0));
	if (off >= 0)
		report_bad(v, "guard", 0, off, "page below the guard: pattern mismatch");
	off = check_pattern(guard + 2 * PAGE, PAGE, seed3(TAG_GUARD, 2, 0));
	if (off >= 0)
		report_bad(v, "guard", 2, off, "page above the guard: pattern mismatch");

	FILE *f = fopen("/proc/self/maps", "re");
	if (!f) {
		vfail(v, "guard: open /proc/self/maps: %s", strerror(errno));
		return;
	}
	char line[512];
	int found = 0;
	uintptr_t want = (uintptr_t)guard + PAGE;
	while (fgets(line, sizeof(line), f)) {
		unsigned long lo, hi;
		char perms[8];
		if (sscanf(line, "%lx-%lx %7s", &lo, &hi, perms) != 3)
			continue;
		if (lo <= want && want < hi) {
			found = 1;
			if (lo != want || hi != want + PAGE || strcmp(perms, "---p") != 0)
				vfail(v, "guard: maps has %lx-%lx %s, want %lx-%lx ---p", lo, hi, perms,
				      (unsigned long)want, (unsigned long)want + PAGE);
		}
	}
	fclose(f);
	if (!found)
		vfail(v, "guard: %lx is not mapped any more", (unsigned long)want);
}

static void check_fds(struct verdict *v)
{
	char buf[PATH_MAX], want[PATH_MAX + 16];
	snprintf(want, sizeof(want), "%s/input.dat", cwd0);
	if (strcmp(fd_target(fd_input, buf, sizeof(buf)), want) != 0)
		vfail(v, "fd %d: points to %s, want %s", fd_input, buf, want);
	if (strcmp(fd_target(fd_null, buf, sizeof(buf)), "/dev/null") != 0)
		vfail(v, "fd %d: points to %s, want /dev/null", fd_null, buf);
	if (strcmp(fd_target(fd_random, buf, sizeof(buf)), "/dev/urandom") != 0)
		vfail(v, "fd %d: points to %s, want /dev/urandom", fd_random, buf);
	if (fcntl(fd_random, F_GETFD) != FD_CLOEXEC)
		vfail(v, "fd %d: FD_CLOEXEC lost", fd_random);
	if (fcntl(fd_null, F_GETFD) != 0)
		vfail(v, "fd %d: FD_CLOEXEC appeared", fd_null);

	off_t pos = lseek(fd_input, 0, SEEK_CUR);
	if (pos != input_off)
		vfail(v, "input.dat: offset %lld, want %lld", (long long)pos, (long long)input_off);
	uint8_t b[100];
	ssize_t n = read(fd_input, b, sizeof(b));
	if (n != (ssize_t)sizeof(b)) {
		vfail(v, "input.dat: read returned %zd (%s)", n, strerror(errno));
	} else {
		for (int i = 0; i < (int)sizeof(b); i++)
			if (b[i] != input_byte((uint64_t)pos + i)) {
				vfail(v, "input.dat: byte at %lld is %#x, want %#x", (long long)pos + i, b[i],
				      input_byte((uint64_t)pos + i));
				break;
			}
	}
	input_off = pos + sizeof(b);
	if (input_off > INPUT_SIZE - 200)
		input_off = lseek(fd_input, 0, SEEK_SET);

	if (write(fd_null, "0123456789", 10) != 10)
		vfail(v, "/dev/null: write: %s", strerror(errno));
	if (read(fd_null, b, 1) != 0)
		vfail(v, "/dev/null: read did not return EOF");
	memset(b, 0, 32);
	if (read(fd_random, b, 32) != 32 || check_zero(b, 32) < 0)
		vfail(v, "/dev/urandom: read failed or gave zeros (%s)", strerror(errno));
	for (int i = 0; i < 3; i++) {
		int fl = fcntl(i, F_GETFL);
		if (fl != stdio_flags[i])
			vfail(v, "fd %d: status flags %#x, want %#x", i, fl, stdio_flags[i]);
	}
}

static void check_process(struct verdict *v)
{
	mode_t m = umask(0);
	umask(m);
	if (m != 027)
		vfail(v, "umask %03o, want 027", (unsigned)m);
	char cwd[PATH_MAX];
	if (!getcwd(cwd, sizeof(cwd)) || strcmp(cwd, cwd0) != 0)
		vfail(v, "cwd %s, want %s", cwd, cwd0);
	check_comm(v, COMM);
	if (tls_magic != seed3(TAG_TLS, (uint64_t)getpid(), 0))
		vfail(v, "tls: __thread value %#llx, want %#llx", (unsigned long long)tls_magic,
		      (unsigned long long)seed3(TAG_TLS, (uint64_t)getpid(), 0));
	long off = check_pattern(tls_words, sizeof(tls_words), seed3(TAG_TLS, 1, 0));
	if (off >= 0)
		vfail(v, "tls: __thread array offset %ld: pattern mismatch", off);

	check_action(v, SIGUSR1, "SIGUSR1", &act_usr1);
	check_action(v, SIGUSR2, "SIGUSR2", &act_usr2);
	check_action(v, SIGTERM, "SIGTERM", &act_term);
	check_action(v, SIGTRAP, "SIGTRAP", &act_trap);
	stack_t ss;
	memset(&ss, 0, sizeof(ss));
	sigaltstack(NULL, &ss);
	if (ss.ss_sp != alt0.ss_sp || ss.ss_size != alt0.ss_size || ss.ss_flags != 0)
		vfail(v, "sigaltstack: sp=%p size=%zu flags=%d, want sp=%p size=%zu flags=0", ss.ss_sp,
		      ss.ss_size, ss.ss_flags, alt0.ss_sp, alt0.ss_size);
	sigset_t cur, want = mask0;
	sigprocmask(SIG_BLOCK, NULL, &cur);
	if (usr2_unblocked)
		sigdelset(&want, SIGUSR2);
	if (!same_sigset(&cur, &want))
		vfail(v, "sigmask %#llx, want %#llx", (unsigned long long)sigset_bits(&cur),
		      (unsigned long long)sigset_bits(&want));
}

static void check_usr2(struct verdict *v, int seq)
{
	sigset_t pend;
	sigpending(&pend);
	int pending = sigismember(&pend, SIGUSR2) == 1;
	uint64_t shd = status_mask("/proc/self/status", "ShdPnd");
	uint64_t thr = status_mask("/proc/self/status", "SigPnd");

	if (opt.usr2_at > 0 && seq == opt.usr2_at) {
		if (!pending)
			vfail(v, "usr2: SIGUSR2 is not pending (ShdPnd=%#llx SigPnd=%#llx)", (unsigned long long)shd,
			      (unsigned long long)thr);
		else if (!(shd & SIGBIT(SIGUSR2)))
			vfail(v, "usr2: SIGUSR2 is pending but not process-wide (ShdPnd=%#llx SigPnd=%#llx)",
			      (unsigned long long)shd, (unsigned long long)thr);
		if (usr2_count != 0)
			vfail(v, "usr2: handler ran %d times while SIGUSR2 was blocked", (int)usr2_count);
		sigset_t m;
		sigemptyset(&m);
		sigaddset(&m, SIGUSR2);
		sigprocmask(SIG_UNBLOCK, &m, NULL); /* the handler runs before this returns */
		usr2_unblocked = 1;
		if (usr2_count != 1) {
			vfail(v, "usr2: handler ran %d times after unblocking, want 1", (int)usr2_count);
		} else {
			if (usr2_code != SI_USER)
				vfail(v, "usr2: si_code %d, want SI_USER (%d)", usr2_code, SI_USER);
			if (opt.usr2_from && usr2_pid != opt.usr2_from)
				vfail(v, "usr2: si_pid %d, want %ld", usr2_pid, opt.usr2_from);
			if (!usr2_onstack)
				vfail(v, "usr2: handler did not run on the alternate signal stack");
			if (!usr2_maskok)
				vfail(v, "usr2: sa_mask (SIGHUP, SIGWINCH) was not applied in the handler");
		}
		return;
	}
	if (usr2_unblocked) {
		if (usr2_count != 1)
			vfail(v, "usr2: handler ran %d times in all, want 1", (int)usr2_count);
		return;
	}
	if (usr2_count != 0)
		vfail(v, "usr2: handler ran %d times, want 0", (int)usr2_count);
	if (opt.usr2_at > 0 && seq > opt.usr2_at)
		vfail(v, "usr2: check %d should have seen SIGUSR2, now at %d", opt.usr2_at, seq);
	if (opt.usr2_at == 0 && pending)
		vfail(v, "usr2: unexpected pending SIGUSR2");
}

static void do_check(int seq, const uint8_t *stackbuf)
{
	struct verdict v = {0};
	if (latched_set)
		vfail(&v, "%s", latched);
	if (seq > 1 && progress <= last_progress)
		vfail(&v, "progress did not advance: %llu <= %llu", (unsigned long long)progress,
		      (unsigned long long)last_progress);
	last_progress = progress;

	check_anon(&v);
	check_files(&v);
	check_heap(&v);
	long off = check_pattern(stackbuf, STACK_SIZE, seed3(TAG_STACK, 0, 0));
	if (off >= 0)
		report_bad(&v, "stack", off / PAGE, off % PAGE, "pattern mismatch");
	check_guard(&v);
	check_clocks(&v, &clk, "clock");
	int cpu = check_cpu(&v, "cpu");
	check_fds(&v);
	check_process(&v);
	check_usr2(&v, seq);

	if (v.failed)
		say("CHECK %d FAIL %s", seq, v.why);
	else
		say("CHECK %d OK progress=%llu usr1=%d usr2=%d cpu=%d input_off=%lld", seq,
		    (unsigned long long)progress, (int)usr1_count, (int)usr2_count, cpu, (long long)input_off);
}

/* step is one unit of the main loop's work: verify, then mutate. */
static void step(void)
{
	int k = (int)((progress * 7919) % (ANON_PAGES / 4));
	int i = 4 * k + 2 + (int)(progress & 1);
	uint8_t *p = anon + (size_t)i * PAGE;
	long off = check_pattern(p, PAGE, seed3(TAG_ANON, i, anon_gen[i]));
	if (off >= 0)
		latch("anon: page %d offset %ld: pattern mismatch (main loop, progress %llu)", i, off,
		      (unsigned long long)progress);
	anon_gen[i]++;
	fill_pattern(p, PAGE, seed3(TAG_ANON, i, anon_gen[i]));

	k = SMALL_STABLE + (int)((progress * 31) % (SMALL_N - SMALL_STABLE));
	struct small *s = &smalls[k];
	off = check_pattern(s->p, s->len, seed3(TAG_SMALL, k, s->gen));
	if (off >= 0)
		latch("heap-small: chunk %d offset %ld: pattern mismatch (main loop)", k, off);
	free(s->p);
	s->gen++;
	s->len = 16 + (mix64(((uint64_t)k << 32) | s->gen) % 1009) / 8 * 8;
	s->p = malloc(s->len);
	if (!s->p) {
		latch("heap-small: malloc(%zu) failed", s->len);
		abort();
	}
	fill_pattern(s->p, s->len, seed3(TAG_SMALL, k, s->gen));

	if (progress % 8 == 0) {
		i = (int)((progress / 8) % (PRIV_PAGES / 3 + 1)) * 3;
		p = priv + (size_t)i * PAGE;
		off = check_pattern(p, PAGE, seed3(TAG_PRIV, i, priv_gen[i]));
		if (off >= 0)
			latch("priv: page %d offset %ld: pattern mismatch (main loop)", i, off);
		priv_gen[i]++;
		fill_pattern(p, PAGE, seed3(TAG_PRIV, i, priv_gen[i]));
	}
	if (progress % 8 == 4 && opt.shared_writes) {
		i = (int)((progress / 8) % SHARED_PAGES);
		p = shared + (size_t)i * PAGE;
		off = check_pattern(p, PAGE, seed3(TAG_SHARED, i, shared_gen[i]));
		if (off >= 0)
			latch("shared: page %d offset %ld: pattern mismatch (main loop)", i, off);
		shared_gen[i]++;
		fill_pattern(p, PAGE, seed3(TAG_SHARED, i, shared_gen[i]));
	}
	if (progress % 16 == 0) {
		struct verdict v = {0};
		check_clocks(&v, &clk, "clock");
		if (v.failed)
			latch("%s (main loop)", v.why);
	}
}

int main(int argc, char **argv)
{
	parse_opts(argc, argv, &opt);
	setup_signals();
	setup_memory();
	setup_files();

	uint8_t stackbuf[STACK_SIZE];
	fill_pattern(stackbuf, STACK_SIZE, seed3(TAG_STACK, 0, 0));
	struct verdict v0 = {0};
	check_clocks(&v0, &clk, "clock");

	say("REGION anon %p %u", (void *)anon, ANON_PAGES * PAGE);
	say("REGION priv %p %u", (void *)priv, PRIV_PAGES * PAGE);
	say("REGION shared %p %u", (void *)shared, SHARED_PAGES * PAGE);
	say("REGION heap-big %p %u", (void *)big, BIG_SIZE);
	say("REGION heap-small %p %zu", (void *)smalls[0].p, smalls[0].len);
	say("REGION brk %p %u", (void *)brkmem, BRK_SIZE);
	say("REGION stack %p %u", (void *)stackbuf, STACK_SIZE);
	say("REGION tls %p %zu", (void *)tls_words, sizeof(tls_words));
	say("REGION guard %p %u", (void *)guard, PAGE);
	say("READY %d", (int)getpid());

	int handled = 0, seq = 0;
	for (;;) {
		if (term_requested) {
			say("EXIT %d progress=%llu%s%s", opt.exit_code, (unsigned long long)progress,
			    latched_set ? " latched=" : "", latched_set ? latched : "");
			exit(opt.exit_code);
		}
		if (usr1_count != handled) {
			handled = usr1_count;
			seq++;
			do_check(seq, stackbuf);
		}
		step();
		progress++;
		sleep_ms(1);
	}
}
