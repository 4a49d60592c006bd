/*
 * fixture.h - the protocol shared by phaul's C test workloads.
 *
 * A workload prints optional "REGION <name> 0x<addr> <len>" and
 * "THREAD <idx> <tid> <role>" lines, then "READY <pid>". Each SIGUSR1 makes
 * the main loop run a full self-check and print exactly one line,
 * "CHECK <seq> OK <key=value...>" or "CHECK <seq> FAIL <reason>". SIGTERM
 * makes it print "EXIT <status> ..." and exit with --exit-code (default 7).
 * A workload that cannot run here prints "SKIP <reason>" and exits 0.
 *
 * Every line goes out in a single write(2), so lines never interleave.
 */
#ifndef PHAUL_FIXTURE_H
#define PHAUL_FIXTURE_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/rseq.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096

/* ---- output ---------------------------------------------------------- */

static inline void write_all(int fd, const char *p, size_t n)
{
	while (n > 0) {
		ssize_t w = write(fd, p, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return;
		}
		p += w;
		n -= (size_t)w;
	}
}

/* say prints one protocol line (a newline is added) with a single write. */
__attribute__((format(printf, 1, 2))) static inline void say(const char *fmt, ...)
{
	char buf[8192];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n > sizeof(buf) - 2)
		n = (int)sizeof(buf) - 2;
	buf[n++] = '\n';
	write_all(1, buf, (size_t)n);
}

/* die reports a setup failure and exits: the harness sees no READY. */
#define die(...)                                                               \
	do {                                                                   \
		char die_buf_[1024];                                           \
		snprintf(die_buf_, sizeof(die_buf_), __VA_ARGS__);             \
		say("SETUP FAIL %s: %s", die_buf_, strerror(errno));           \
		exit(3);                                                       \
	} while (0)

/* ---- verdicts -------------------------------------------------------- */

/* A verdict collects the reasons one check failed. */
struct verdict {
	int failed;
	size_t len;
	char why[3000];
};

__attribute__((format(printf, 2, 3))) static inline void vfail(struct verdict *v, const char *fmt, ...)
{
	v->failed++;
	if (v->len >= sizeof(v->why) - 8)
		return;
	if (v->len > 0) {
		memcpy(v->why + v->len, "; ", 2);
		v->len += 2;
	}
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(v->why + v->len, sizeof(v->why) - v->len, fmt, ap);
	va_end(ap);
	if (n > 0)
		v->len += (size_t)n;
	if (v->len >= sizeof(v->why))
		v->len = sizeof(v->why) - 1;
	/* A protocol line must stay one line. */
	for (size_t i = 0; i < v->len; i++)
		if (v->why[i] == '\n')
			v->why[i] = ' ';
}

/*
 * Latched failures: problems found between checks (by the main loop or by a
 * thread) are kept here and reported by the next check. The first one wins.
 */
static char latched[1024];
static int latch_taken;
static volatile int latched_set;

__attribute__((format(printf, 1, 2))) static inline void latch(const char *fmt, ...)
{
	if (__atomic_exchange_n(&latch_taken, 1, __ATOMIC_ACQ_REL))
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(latched, sizeof(latched), fmt, ap);
	va_end(ap);
	__atomic_store_n(&latched_set, 1, __ATOMIC_RELEASE);
}

/* ---- patterns -------------------------------------------------------- */

static inline uint64_t mix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static inline uint64_t seed3(uint64_t tag, uint64_t i, uint64_t gen)
{
	return mix64(tag * 0x100000001b3ull ^ mix64(i * 0x2545f4914f6cdd1dull + gen));
}

/* fill_pattern writes a pattern derived from seed; len is a multiple of 8. */
static inline void fill_pattern(void *p, size_t len, uint64_t seed)
{
	uint64_t *w = p;
	for (size_t i = 0; i < len / 8; i++)
		w[i] = mix64(seed + i);
}

/* check_pattern returns -1 when p holds the pattern, else the first bad offset. */
static inline long check_pattern(const void *p, size_t len, uint64_t seed)
{
	const uint64_t *w = p;
	for (size_t i = 0; i < len / 8; i++)
		if (w[i] != mix64(seed + i))
			return (long)(i * 8);
	return -1;
}

/* check_zero returns -1 when p is all zero, else the first non-zero offset. */
static inline long check_zero(const void *p, size_t len)
{
	const uint64_t *w = p;
	for (size_t i = 0; i < len / 8; i++)
		if (w[i] != 0)
			return (long)(i * 8);
	return -1;
}

/* ---- options --------------------------------------------------------- */

struct opts {
	int exit_code;   /* --exit-code N: status on SIGTERM (default 7) */
	int usr2_at;     /* --usr2-at N: check N expects a pending SIGUSR2 */
	long usr2_from;  /* --usr2-from PID: its expected si_pid */
	int usr2_thread; /* --usr2-thread K: thread K gets it (threads.c) */
	long mib;        /* --mib N (bigmem.c) */
	const char *resource; /* --resource NAME (unsupported.c) */
	int shared_writes;    /* --shared-writes 0|1: memory.c keeps writing shared.dat (default 1) */
};

static inline void parse_opts(int argc, char **argv, struct opts *o)
{
	o->exit_code = 7;
	o->usr2_thread = 3;
	o->shared_writes = 1;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		const char *val = i + 1 < argc ? argv[i + 1] : NULL;
		if (val == NULL) {
			say("SETUP FAIL option %s needs a value", a);
			exit(2);
		}
		if (strcmp(a, "--exit-code") == 0)
			o->exit_code = atoi(val);
		else if (strcmp(a, "--usr2-at") == 0)
			o->usr2_at = atoi(val);
		else if (strcmp(a, "--usr2-from") == 0)
			o->usr2_from = atol(val);
		else if (strcmp(a, "--usr2-thread") == 0)
			o->usr2_thread = atoi(val);
		else if (strcmp(a, "--mib") == 0)
			o->mib = atol(val);
		else if (strcmp(a, "--resource") == 0)
			o->resource = val;
		else if (strcmp(a, "--shared-writes") == 0)
			o->shared_writes = atoi(val);
		else {
			say("SETUP FAIL unknown option %s", a);
			exit(2);
		}
		i++;
	}
}

/* ---- signals --------------------------------------------------------- */

static volatile sig_atomic_t usr1_count;
static volatile sig_atomic_t term_requested;

static inline void on_usr1(int sig)
{
	(void)sig;
	usr1_count++;
}

static inline void on_term(int sig)
{
	(void)sig;
	term_requested = 1;
}

/* query_action returns the kernel's current sigaction for sig. */
static inline struct sigaction query_action(int sig)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sigaction(sig, NULL, &sa);
	return sa;
}

/* same_sigset compares the first 64 signals (what the kernel keeps). */
static inline int same_sigset(const sigset_t *a, const sigset_t *b)
{
	for (int s = 1; s <= 64; s++)
		if (sigismember(a, s) != sigismember(b, s))
			return 0;
	return 1;
}

static inline uint64_t sigset_bits(const sigset_t *s)
{
	uint64_t m = 0;
	for (int i = 1; i <= 64; i++)
		if (sigismember(s, i) == 1)
			m |= 1ull << (i - 1);
	return m;
}

static inline void check_action(struct verdict *v, int sig, const char *name, const struct sigaction *want)
{
	struct sigaction got = query_action(sig);
	if (got.sa_handler != want->sa_handler)
		vfail(v, "sigaction(%s): handler %p, want %p", name, (void *)got.sa_handler,
		      (void *)want->sa_handler);
	if (got.sa_flags != want->sa_flags)
		vfail(v, "sigaction(%s): sa_flags %#x, want %#x", name, (unsigned)got.sa_flags,
		      (unsigned)want->sa_flags);
	if (!same_sigset(&got.sa_mask, &want->sa_mask))
		vfail(v, "sigaction(%s): sa_mask %#llx, want %#llx", name,
		      (unsigned long long)sigset_bits(&got.sa_mask),
		      (unsigned long long)sigset_bits(&want->sa_mask));
}

/*
 * status_mask reads a hex signal mask field (SigPnd, ShdPnd, SigBlk, ...) from
 * a /proc status file; it returns ~0 when the field is missing.
 */
static inline uint64_t status_mask(const char *path, const char *field)
{
	char buf[8192];
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return ~0ull;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return ~0ull;
	buf[n] = 0;
	size_t fl = strlen(field);
	for (char *line = buf; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
		if (strncmp(line, field, fl) == 0 && line[fl] == ':')
			return strtoull(line + fl + 1, NULL, 16);
	}
	return ~0ull;
}

#define SIGBIT(s) (1ull << ((s)-1))

/* ---- clocks, CPU, rseq ----------------------------------------------- */

struct clockstate {
	int have;
	struct timespec last_mono;
};

static inline double ts_sec(struct timespec t) { return (double)t.tv_sec + (double)t.tv_nsec / 1e9; }

static inline int ts_less(struct timespec a, struct timespec b)
{
	return a.tv_sec < b.tv_sec || (a.tv_sec == b.tv_sec && a.tv_nsec < b.tv_nsec);
}

/*
 * check_clocks compares the vDSO clocks with the system calls behind them: a
 * vDSO whose data page is wrong after restore answers garbage.
 */
static inline void check_clocks(struct verdict *v, struct clockstate *cs, const char *who)
{
	struct timespec mono, rawmono, real, rawreal;
	clock_gettime(CLOCK_MONOTONIC, &mono);
	syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &rawmono);
	clock_gettime(CLOCK_REALTIME, &real);
	syscall(SYS_clock_gettime, CLOCK_REALTIME, &rawreal);
	time_t now = time(NULL);
	if (cs->have && ts_less(mono, cs->last_mono))
		vfail(v, "%s: CLOCK_MONOTONIC went backwards: %.6f < %.6f", who, ts_sec(mono),
		      ts_sec(cs->last_mono));
	double d = ts_sec(rawmono) - ts_sec(mono);
	if (d < -0.001 || d > 2)
		vfail(v, "%s: vDSO CLOCK_MONOTONIC %.6f vs syscall %.6f", who, ts_sec(mono), ts_sec(rawmono));
	d = ts_sec(rawreal) - ts_sec(real);
	if (d < -0.001 || d > 2)
		vfail(v, "%s: vDSO CLOCK_REALTIME %.6f vs syscall %.6f", who, ts_sec(real), ts_sec(rawreal));
	d = (double)now - ts_sec(real);
	if (d < -3 || d > 3)
		vfail(v, "%s: time(NULL)=%lld is %.1fs away from CLOCK_REALTIME", who, (long long)now, d);
	cs->have = 1;
	cs->last_mono = mono;
}

#define RSEQ_SIG_X86 0x53053053

static inline struct rseq *rseq_area(void)
{
	return (struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
}

/*
 * check_cpu verifies that sched_getcpu (which glibc answers from the rseq
 * area) is a CPU of our affinity mask, and that the kernel still has this
 * thread's rseq area registered: registering the same area again must fail
 * with EBUSY, and succeeds only when nothing was registered.
 */
static inline int check_cpu(struct verdict *v, const char *who)
{
	int cpu = sched_getcpu();
	cpu_set_t set;
	CPU_ZERO(&set);
	if (cpu < 0) {
		vfail(v, "%s: sched_getcpu: %s", who, strerror(errno));
	} else if (sched_getaffinity(0, sizeof(set), &set) == 0 && !CPU_ISSET(cpu, &set)) {
		vfail(v, "%s: sched_getcpu()=%d is not in the affinity mask", who, cpu);
	}
	if (__rseq_size == 0)
		return cpu; /* glibc did not register rseq (tunable): nothing to check */
	struct rseq *r = rseq_area();
	long rc = syscall(SYS_rseq, r, 32, 0, RSEQ_SIG_X86);
	int e = errno;
	if (rc == 0) {
		vfail(v, "%s: rseq: the area %p was not registered with the kernel", who, (void *)r);
	} else if (e != EBUSY) {
		rc = syscall(SYS_rseq, r, __rseq_size, 0, RSEQ_SIG_X86);
		if (rc == 0 || errno != EBUSY)
			vfail(v, "%s: rseq: area %p registered with other parameters (%s)", who, (void *)r,
			      strerror(e));
	}
	if (cpu >= 0 && (int)r->cpu_id < 0)
		vfail(v, "%s: rseq cpu_id=%d", who, (int)r->cpu_id);
	return cpu;
}

/* ---- small /proc helpers --------------------------------------------- */

/* fd_target reads the target of /proc/self/fd/N into buf ("" on error). */
static inline const char *fd_target(int fd, char *buf, size_t len)
{
	char path[64];
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	ssize_t n = readlink(path, buf, len - 1);
	if (n < 0)
		n = 0;
	buf[n] = 0;
	return buf;
}

static inline void check_comm(struct verdict *v, const char *want)
{
	char name[17] = {0};
	prctl(PR_GET_NAME, name, 0, 0, 0);
	if (strcmp(name, want) != 0)
		vfail(v, "comm: PR_GET_NAME=%s, want %s", name, want);
}

static inline void sleep_ms(long ms)
{
	struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
	nanosleep(&ts, NULL);
}

#endif /* PHAUL_FIXTURE_H */
