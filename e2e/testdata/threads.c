/*
 * threads.c - a multi-threaded workload whose self-check covers per-thread
 * state: TIDs, __thread values, per-thread signal masks and alternate signal
 * stacks, a pattern on each thread's stack, each thread's rseq registration, threads caught spinning,
 * sleeping in nanosleep, waiting on a condition variable with a timeout and
 * blocked in FUTEX_WAIT, and (with --usr2-at N) a thread-directed pending
 * SIGUSR2 sent with tgkill to thread --usr2-thread K.
 *
 * On SIGTERM every thread is stopped and joined with pthread_join (which
 * needs the kernel's clear_child_tid to work after a restore), then the
 * program exits with --exit-code.
 *
 * Build: gcc -O2 -Wall -pthread threads.c -o threads
 * Protocol: see fixture.h.
 */
#include "fixture.h"

#include <dirent.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>

#define NTHREADS 6
#define STACKBUF 16384
#define COMM "phaul-threads"

enum role { SPIN, SLEEP, CONDVAR, FUTEX };
static const char *role_name[] = {"spin", "sleep", "condvar", "futex"};
static const enum role roles[NTHREADS] = {SPIN, SPIN, SLEEP, SLEEP, CONDVAR, FUTEX};

struct slot {
	int idx;
	enum role role;
	pthread_t th;
	pid_t tid;
	sigset_t mask; /* the mask the thread set for itself */
	uint8_t *stackbuf;
	_Atomic uint64_t counter;
	_Atomic int started;
	_Atomic int reported; /* generation of the last report */
	/* the last report */
	pid_t rep_tid;
	uint64_t rep_tls;
	uint64_t rep_counter;
	sigset_t rep_mask;
	struct verdict rep_v;
	uint64_t last_counter;
	int usr2_done;
};

static struct opts opt;
static struct slot slots[NTHREADS];
static _Atomic int report_gen;
static _Atomic int stop;
static _Atomic int futex_word;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv;
static __thread uint64_t tls_val;
static __thread int tls_idx = -1;
static pid_t main_tid;
/* Each thread's alternate signal stack: its own buffer, a size of its own. */
#define ALTSTACK_MAX (64 * 1024)
static uint8_t altstacks[NTHREADS][ALTSTACK_MAX];
static size_t altstack_size(int idx) { return 32 * 1024 + 4096 * (size_t)idx; }
static sigset_t main_mask;
static struct sigaction act_usr1, act_usr2, act_term;
static struct clockstate clk;
static uint64_t progress, last_progress;

static volatile sig_atomic_t usr2_count;
static volatile int usr2_tid, usr2_code, usr2_pid;

static void on_usr2(int sig, siginfo_t *si, void *uc)
{
	(void)sig;
	(void)uc;
	usr2_count++;
	usr2_tid = (int)syscall(SYS_gettid);
	usr2_code = si->si_code;
	usr2_pid = si->si_pid;
}

static uint64_t tls_magic(int idx) { return seed3(0x7415, (uint64_t)idx, (uint64_t)getpid()); }

static long futex(_Atomic int *uaddr, int op, int val)
{
	return syscall(SYS_futex, uaddr, op, val, NULL, NULL, 0);
}

/* thread_mask builds the distinct mask of thread idx. */
static void thread_mask(int idx, sigset_t *m)
{
	sigemptyset(m);
	sigaddset(m, SIGUSR1); /* checks and SIGTERM go to the main thread */
	sigaddset(m, SIGTERM);
	sigaddset(m, SIGUSR2);
	switch (idx) {
	case 1:
		sigaddset(m, SIGHUP);
		break;
	case 2:
		sigaddset(m, SIGWINCH);
		sigaddset(m, SIGRTMIN + 2);
		break;
	case 3:
		sigaddset(m, SIGALRM);
		break;
	case 4:
		sigaddset(m, SIGRTMIN + 4);
		sigaddset(m, SIGPIPE);
		break;
	case 5:
		sigaddset(m, SIGCHLD);
		sigaddset(m, SIGRTMIN + 5);
		break;
	}
}

static uint64_t thread_self_mask(const char *field)
{
	return status_mask("/proc/thread-self/status", field);
}

/* report is run by a worker for generation gen: it fills its slot. */
static void report(struct slot *s, int gen)
{
	struct verdict *v = &s->rep_v;
	memset(v, 0, sizeof(*v));
	char who[32];
	snprintf(who, sizeof(who), "thread %d", s->idx);
	s->rep_tid = (pid_t)syscall(SYS_gettid);
	s->rep_tls = tls_val;
	if (tls_idx != s->idx)
		vfail(v, "%s: __thread idx %d", who, tls_idx);
	pthread_sigmask(SIG_BLOCK, NULL, &s->rep_mask);
	stack_t ss;
	if (sigaltstack(NULL, &ss))
		vfail(v, "%s: sigaltstack: %s", who, strerror(errno));
	else if (ss.ss_sp != altstacks[s->idx] || ss.ss_size != altstack_size(s->idx) || ss.ss_flags != 0)
		vfail(v, "%s: sigaltstack sp=%p size=%zu flags=%d, want sp=%p size=%zu flags=0", who, ss.ss_sp,
		      ss.ss_size, ss.ss_flags, (void *)altstacks[s->idx], altstack_size(s->idx));
	s->rep_counter = s->counter;
	long off = check_pattern(s->stackbuf, STACKBUF, seed3(0x57ac, (uint64_t)s->idx, 0));
	if (off >= 0)
		vfail(v, "stack-%d: offset %ld: pattern mismatch", s->idx, off);
	check_cpu(v, who);

	if (s->idx == opt.usr2_thread && opt.usr2_at > 0) {
		if (gen == opt.usr2_at) {
			sigset_t pend;
			sigpending(&pend);
			uint64_t thr = thread_self_mask("SigPnd"), shd = thread_self_mask("ShdPnd");
			if (sigismember(&pend, SIGUSR2) != 1)
				vfail(v, "usr2: %s: SIGUSR2 is not pending (SigPnd=%#llx ShdPnd=%#llx)", who,
				      (unsigned long long)thr, (unsigned long long)shd);
			else if (!(thr & SIGBIT(SIGUSR2)) || (shd & SIGBIT(SIGUSR2)))
				vfail(v, "usr2: %s: SIGUSR2 is pending process-wide, not for this thread (SigPnd=%#llx ShdPnd=%#llx)",
				      who, (unsigned long long)thr, (unsigned long long)shd);
			if (usr2_count != 0)
				vfail(v, "usr2: handler ran %d times while SIGUSR2 was blocked", (int)usr2_count);
			sigset_t m;
			sigemptyset(&m);
			sigaddset(&m, SIGUSR2);
			pthread_sigmask(SIG_UNBLOCK, &m, NULL); /* handler runs here */
			pthread_sigmask(SIG_BLOCK, &m, NULL);
			s->usr2_done = 1;
			if (usr2_count != 1)
				vfail(v, "usr2: handler ran %d times after unblocking, want 1", (int)usr2_count);
			else {
				if (usr2_tid != s->rep_tid)
					vfail(v, "usr2: handler ran in thread %d, want %d", usr2_tid, s->rep_tid);
				if (usr2_code != SI_TKILL)
					vfail(v, "usr2: si_code %d, want SI_TKILL (%d)", usr2_code, SI_TKILL);
				if (opt.usr2_from && usr2_pid != opt.usr2_from)
					vfail(v, "usr2: si_pid %d, want %ld", usr2_pid, opt.usr2_from);
			}
		} else if (s->usr2_done && usr2_count != 1) {
			vfail(v, "usr2: handler ran %d times in all, want 1", (int)usr2_count);
		} else if (!s->usr2_done && gen > opt.usr2_at) {
			vfail(v, "usr2: check %d should have seen SIGUSR2", opt.usr2_at);
		}
	}
	atomic_store(&s->reported, gen);
}

static void *worker(void *arg)
{
	struct slot *s = arg;
	uint8_t stackbuf[STACKBUF];
	fill_pattern(stackbuf, STACKBUF, seed3(0x57ac, (uint64_t)s->idx, 0));
	s->stackbuf = stackbuf;
	tls_val = tls_magic(s->idx);
	tls_idx = s->idx;
	pthread_sigmask(SIG_SETMASK, &s->mask, NULL);
	stack_t alt = {.ss_sp = altstacks[s->idx], .ss_size = altstack_size(s->idx)};
	if (sigaltstack(&alt, NULL))
		die("sigaltstack");
	s->tid = (pid_t)syscall(SYS_gettid);
	atomic_store(&s->started, 1);

	uint64_t x = (uint64_t)s->idx;
	while (!atomic_load(&stop)) {
		s->counter++;
		int g = atomic_load(&report_gen);
		if (g != atomic_load(&s->reported))
			report(s, g);
		switch (s->role) {
		case SPIN: {
			/* about 1 ms of user-mode work, then a 3 ms rest */
			struct timespec t0, t;
			clock_gettime(CLOCK_MONOTONIC, &t0);
			do {
				for (int i = 0; i < 1000; i++)
					x = mix64(x);
				clock_gettime(CLOCK_MONOTONIC, &t);
			} while ((t.tv_sec - t0.tv_sec) * 1000000000L + t.tv_nsec - t0.tv_nsec < 1000000L);
			if (x == 42)
				latch("impossible");
			sleep_ms(3);
			break;
		}
		case SLEEP:
			sleep_ms(5);
			break;
		case CONDVAR: {
			struct timespec dl;
			clock_gettime(CLOCK_MONOTONIC, &dl);
			dl.tv_nsec += 50 * 1000000L;
			if (dl.tv_nsec >= 1000000000L) {
				dl.tv_sec++;
				dl.tv_nsec -= 1000000000L;
			}
			pthread_mutex_lock(&mu);
			if (atomic_load(&report_gen) == atomic_load(&s->reported) && !atomic_load(&stop))
				pthread_cond_timedwait(&cv, &mu, &dl);
			pthread_mutex_unlock(&mu);
			break;
		}
		case FUTEX: {
			int w = atomic_load(&futex_word);
			if (atomic_load(&report_gen) == atomic_load(&s->reported) && !atomic_load(&stop))
				futex(&futex_word, FUTEX_WAIT_PRIVATE, w); /* no timeout */
			break;
		}
		}
		long off = check_pattern(stackbuf, 64, seed3(0x57ac, (uint64_t)s->idx, 0));
		if (off >= 0)
			latch("stack-%d: offset %ld: pattern mismatch (thread loop)", s->idx, off);
	}
	return (void *)(uintptr_t)tls_magic(s->idx);
}

static void wake_all(void)
{
	atomic_fetch_add(&futex_word, 1);
	futex(&futex_word, FUTEX_WAKE_PRIVATE, INT32_MAX);
	pthread_mutex_lock(&mu);
	pthread_cond_broadcast(&cv);
	pthread_mutex_unlock(&mu);
}

static int cmp_pid(const void *a, const void *b) { return *(const pid_t *)a - *(const pid_t *)b; }

/* check_tasks compares /proc/self/task with the TIDs recorded at start. */
static void check_tasks(struct verdict *v)
{
	pid_t want[NTHREADS + 1], got[64];
	int n = 0;
	want[0] = main_tid;
	for (int i = 0; i < NTHREADS; i++)
		want[i + 1] = slots[i].tid;
	DIR *d = opendir("/proc/self/task");
	if (!d) {
		vfail(v, "tasks: opendir /proc/self/task: %s", strerror(errno));
		return;
	}
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		if (e->d_name[0] == '.')
			continue;
		if (n < 64)
			got[n] = atoi(e->d_name);
		n++;
	}
	closedir(d);
	if (n != NTHREADS + 1) {
		vfail(v, "tasks: /proc/self/task has %d threads, want %d", n, NTHREADS + 1);
		return;
	}
	qsort(want, NTHREADS + 1, sizeof(pid_t), cmp_pid);
	qsort(got, NTHREADS + 1, sizeof(pid_t), cmp_pid);
	for (int i = 0; i <= NTHREADS; i++)
		if (want[i] != got[i]) {
			vfail(v, "tasks: TID %d is gone from /proc/self/task (found %d)", want[i], got[i]);
			return;
		}
}

static void do_check(int seq)
{
	struct verdict v = {0};
	if (latched_set)
		vfail(&v, "%s", latched);
	if (seq > 1 && progress <= last_progress)
		vfail(&v, "progress did not advance: %llu <= %llu", (unsigned long long)progress,
		      (unsigned long long)last_progress);
	last_progress = progress;

	atomic_store(&report_gen, seq);
	wake_all();
	struct timespec t0, t;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		int done = 1;
		for (int i = 0; i < NTHREADS; i++)
			if (atomic_load(&slots[i].reported) != seq)
				done = 0;
		if (done)
			break;
		clock_gettime(CLOCK_MONOTONIC, &t);
		if (t.tv_sec - t0.tv_sec > 3)
			break;
		sleep_ms(1);
	}
	uint64_t total = 0;
	for (int i = 0; i < NTHREADS; i++) {
		struct slot *s = &slots[i];
		if (atomic_load(&s->reported) != seq) {
			vfail(&v, "thread %d (%s, tid %d) did not report within 3s", i, role_name[s->role], s->tid);
			continue;
		}
		if (s->rep_v.failed)
			vfail(&v, "%s", s->rep_v.why);
		if (s->rep_tid != s->tid)
			vfail(&v, "thread %d: gettid()=%d, want %d", i, s->rep_tid, s->tid);
		if (s->rep_tls != tls_magic(i))
			vfail(&v, "thread %d: __thread value %#llx, want %#llx", i, (unsigned long long)s->rep_tls,
			      (unsigned long long)tls_magic(i));
		if (!same_sigset(&s->rep_mask, &s->mask))
			vfail(&v, "thread %d: sigmask %#llx, want %#llx", i,
			      (unsigned long long)sigset_bits(&s->rep_mask), (unsigned long long)sigset_bits(&s->mask));
		if (seq > 1 && s->rep_counter <= s->last_counter)
			vfail(&v, "thread %d (%s): counter did not advance: %llu <= %llu", i, role_name[s->role],
			      (unsigned long long)s->rep_counter, (unsigned long long)s->last_counter);
		s->last_counter = s->rep_counter;
		total += s->rep_counter;
	}
	if ((pid_t)syscall(SYS_gettid) != main_tid)
		vfail(&v, "main: gettid()=%ld, want %d", syscall(SYS_gettid), main_tid);
	if (tls_idx != 99 || tls_val != tls_magic(99))
		vfail(&v, "main: __thread values lost");
	sigset_t cur;
	sigprocmask(SIG_BLOCK, NULL, &cur);
	if (!same_sigset(&cur, &main_mask))
		vfail(&v, "main: sigmask %#llx, want %#llx", (unsigned long long)sigset_bits(&cur),
		      (unsigned long long)sigset_bits(&main_mask));
	check_action(&v, SIGUSR1, "SIGUSR1", &act_usr1);
	check_action(&v, SIGUSR2, "SIGUSR2", &act_usr2);
	check_action(&v, SIGTERM, "SIGTERM", &act_term);
	check_tasks(&v);
	check_clocks(&v, &clk, "main");
	check_cpu(&v, "main");
	check_comm(&v, COMM);

	if (v.failed)
		say("CHECK %d FAIL %s", seq, v.why);
	else
		say("CHECK %d OK progress=%llu threads=%d counters=%llu usr2=%d", seq, (unsigned long long)progress,
		    NTHREADS + 1, (unsigned long long)total, (int)usr2_count);
}

static void finish(void)
{
	atomic_store(&stop, 1);
	wake_all();
	int joined = 0;
	for (int i = 0; i < NTHREADS; i++) {
		struct timespec dl;
		clock_gettime(CLOCK_REALTIME, &dl);
		dl.tv_sec += 5;
		void *ret = NULL;
		int err = pthread_timedjoin_np(slots[i].th, &ret, &dl);
		if (err) {
			say("EXIT FAIL pthread_join(thread %d, tid %d): %s", i, slots[i].tid, strerror(err));
			exit(99);
		}
		if ((uintptr_t)ret != (uintptr_t)tls_magic(i)) {
			say("EXIT FAIL thread %d returned %p", i, ret);
			exit(99);
		}
		joined++;
	}
	say("EXIT %d joined=%d progress=%llu%s%s", opt.exit_code, joined, (unsigned long long)progress,
	    latched_set ? " latched=" : "", latched_set ? latched : "");
	exit(opt.exit_code);
}

int main(int argc, char **argv)
{
	parse_opts(argc, argv, &opt);
	if (prctl(PR_SET_NAME, COMM, 0, 0, 0))
		die("PR_SET_NAME");
	main_tid = (pid_t)syscall(SYS_gettid);
	tls_idx = 99;
	tls_val = tls_magic(99);

	pthread_condattr_t ca;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&cv, &ca);

	/* The main thread blocks only SIGUSR2: it takes SIGUSR1 and SIGTERM. */
	sigemptyset(&main_mask);
	sigaddset(&main_mask, SIGUSR2);
	sigprocmask(SIG_SETMASK, &main_mask, NULL);

	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR1, &sa, NULL))
		die("sigaction USR1");
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_usr2;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sigemptyset(&sa.sa_mask);
	sigaddset(&sa.sa_mask, SIGPIPE);
	if (sigaction(SIGUSR2, &sa, NULL))
		die("sigaction USR2");
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_term;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGTERM, &sa, NULL))
		die("sigaction TERM");
	act_usr1 = query_action(SIGUSR1);
	act_usr2 = query_action(SIGUSR2);
	act_term = query_action(SIGTERM);

	for (int i = 0; i < NTHREADS; i++) {
		slots[i].idx = i;
		slots[i].role = roles[i];
		thread_mask(i, &slots[i].mask);
		int err = pthread_create(&slots[i].th, NULL, worker, &slots[i]);
		if (err) {
			errno = err;
			die("pthread_create");
		}
	}
	for (int i = 0; i < NTHREADS; i++)
		while (!atomic_load(&slots[i].started))
			sleep_ms(1);

	struct verdict v0 = {0};
	check_clocks(&v0, &clk, "main");
	for (int i = 0; i < NTHREADS; i++) {
		say("THREAD %d %d %s", i, slots[i].tid, role_name[slots[i].role]);
		say("REGION stack-%d %p %d", i, (void *)slots[i].stackbuf, STACKBUF);
	}
	say("READY %d", (int)getpid());

	int handled = 0, seq = 0;
	for (;;) {
		if (term_requested)
			finish();
		if (usr1_count != handled) {
			handled = usr1_count;
			seq++;
			do_check(seq);
		}
		progress++;
		if (progress % 16 == 0) {
			struct verdict v = {0};
			check_clocks(&v, &clk, "main");
			if (v.failed)
				latch("%s (main loop)", v.why);
		}
		sleep_ms(2);
	}
}
