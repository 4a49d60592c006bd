/*
 * tree_epoll.c - a child process waiting in epoll on an eventfd and timerfds.
 *
 * Usage: tree_epoll [--single] [--oneshot-ms N] [fixture options]
 *
 * The root creates two eventfds, "ticks" and "acc", then forks a child (the
 * waiter) that sleeps in epoll_wait(-1) on ticks and three timerfds:
 *   periodic  CLOCK_MONOTONIC, every 50 ms from the start; the waiter counts
 *             the expirations (the ones missed while frozen included) and
 *             compares them with the clock;
 *   oneshot   CLOCK_MONOTONIC, relative, N ms (default 2000), armed at the
 *             first check; the waiter records when it fired;
 *   abs       CLOCK_REALTIME, absolute (TFD_TIMER_ABSTIME), N+500 ms after
 *             the first check; the waiter records when it fired.
 * The root adds 1 to ticks every 20 ms (the waiter reads them), and 1 to acc
 * at every check, before asking the waiter; nobody reads acc: its counter
 * (started at 1000) must be 1000+seq in the waiter's /proc/self/fdinfo.
 * The waiter's ticks read plus still pending must equal the root's ticks.
 *
 * CHECK fields (tree): waiter_oneshot_armed, waiter_oneshot_fired (CLOCK_
 * MONOTONIC ns, 0 while pending), waiter_abs_target, waiter_abs_fired
 * (CLOCK_REALTIME ns), waiter_periodic, progress (the root's ticks).
 * --single: one process does both sides (what phaul could dump before
 * process trees); the fields then come without the "waiter_" prefix.
 *
 * Protocol: tree_fixture.h.
 */
#include "tree_fixture.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>

#define PERIOD_NS 50000000LL

static int single;
static long oneshot_ms = 2000;
static int ticks_fd, acc_fd, ep, tper, tone, tabs;
static int64_t start_mono;
static uint64_t periodic_exp, ticks_read, ticks_written;
static int64_t oneshot_armed, oneshot_fired, abs_target, abs_fired;
static struct ids my_ids;
static struct clockstate clk;

static int64_t now_ns(clockid_t c)
{
	struct timespec t;
	clock_gettime(c, &t);
	return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static struct timespec ns_ts(int64_t ns)
{
	struct timespec t = {ns / 1000000000LL, ns % 1000000000LL};
	return t;
}

/*
 * fdinfo_value reads "key: value" (in base) from /proc/self/fdinfo/fd (-1 if
 * absent); lines, when set, counts the lines starting with key.
 */
static long long fdinfo_value(int fd, const char *key, int base, int *lines)
{
	char path[64], buf[8192];
	snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
	int f = open(path, O_RDONLY | O_CLOEXEC);
	if (f < 0)
		return -1;
	ssize_t n = read(f, buf, sizeof(buf) - 1);
	close(f);
	if (n <= 0)
		return -1;
	buf[n] = 0;
	long long v = -1;
	size_t kl = strlen(key);
	if (lines)
		*lines = 0;
	for (char *l = buf; l && *l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : NULL) {
		if (strncmp(l, key, kl) == 0) {
			if (lines)
				(*lines)++;
			if (l[kl] == ':')
				v = strtoll(l + kl + 1, NULL, base);
		}
	}
	return v;
}

/* drain reads every ready descriptor without blocking. */
static void drain(void)
{
	uint64_t x;
	if (read(tper, &x, 8) == 8)
		periodic_exp += x;
	if (read(ticks_fd, &x, 8) == 8)
		ticks_read += x;
	if (read(tone, &x, 8) == 8 && oneshot_fired == 0)
		oneshot_fired = now_ns(CLOCK_MONOTONIC);
	if (read(tabs, &x, 8) == 8 && abs_fired == 0)
		abs_fired = now_ns(CLOCK_REALTIME);
}

static void waiter_setup(void)
{
	ep = epoll_create1(EPOLL_CLOEXEC);
	tper = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	tone = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	tabs = timerfd_create(CLOCK_REALTIME, TFD_NONBLOCK | TFD_CLOEXEC);
	if (ep < 0 || tper < 0 || tone < 0 || tabs < 0)
		die("epoll_create1/timerfd_create");
	start_mono = now_ns(CLOCK_MONOTONIC);
	struct itimerspec its = {.it_interval = ns_ts(PERIOD_NS), .it_value = ns_ts(start_mono + PERIOD_NS)};
	if (timerfd_settime(tper, TFD_TIMER_ABSTIME, &its, NULL))
		die("timerfd_settime periodic");
	int fds[4] = {ticks_fd, tper, tone, tabs};
	for (int i = 0; i < 4; i++) {
		struct epoll_event e = {.events = EPOLLIN, .data.fd = fds[i]};
		if (epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &e))
			die("epoll_ctl");
	}
}

static void waiter_wait(int timeout_ms)
{
	struct epoll_event evs[4];
	int n = epoll_wait(ep, evs, 4, timeout_ms);
	if (n < 0 && errno != EINTR)
		latch("epoll_wait: %s", strerror(errno));
	drain();
}

static void waiter_check(int seq, struct verdict *v, char *kv, size_t len)
{
	if (seq == 1) {
		/* Arm the one-shot timers. */
		oneshot_armed = now_ns(CLOCK_MONOTONIC);
		struct itimerspec its = {.it_value = ns_ts(oneshot_ms * 1000000LL)};
		if (timerfd_settime(tone, 0, &its, NULL))
			vfail(v, "timerfd_settime oneshot: %s", strerror(errno));
		abs_target = now_ns(CLOCK_REALTIME) + (oneshot_ms + 500) * 1000000LL;
		its.it_value = ns_ts(abs_target);
		if (timerfd_settime(tabs, TFD_TIMER_ABSTIME, &its, NULL))
			vfail(v, "timerfd_settime abs: %s", strerror(errno));
	}
	if (!single)
		check_ids(v, "waiter", my_ids);
	check_clocks(v, &clk, "waiter");
	drain();
	int64_t now = now_ns(CLOCK_MONOTONIC);
	int64_t want = (now - start_mono) / PERIOD_NS;
	if ((int64_t)periodic_exp < want - 1 || (int64_t)periodic_exp > want + 1)
		vfail(v, "periodic timer: %llu expirations in %.3f s, want %lld", (unsigned long long)periodic_exp,
		      (double)(now - start_mono) / 1e9, (long long)want);
	int ntfd = 0;
	fdinfo_value(ep, "tfd", 10, &ntfd);
	if (ntfd != 4)
		vfail(v, "epoll instance watches %d descriptors, want 4", ntfd);
	long long acc = fdinfo_value(acc_fd, "eventfd-count", 16, NULL); /* printed in hex */
	if (acc != 1000 + seq)
		vfail(v, "eventfd acc counts %lld, want %d", acc, 1000 + seq);
	long long pending = fdinfo_value(ticks_fd, "eventfd-count", 16, NULL);
	check_flags(v, "eventfd ticks", ticks_fd, O_RDWR | O_NONBLOCK);
	check_flags(v, "eventfd acc", acc_fd, O_RDWR);
	if (!single)
		kvf(kv, len, "progress=%llu", (unsigned long long)(periodic_exp + ticks_read));
	kvf(kv, len, "periodic=%llu ticks=%llu oneshot_armed=%lld oneshot_fired=%lld abs_target=%lld abs_fired=%lld",
	    (unsigned long long)periodic_exp, (unsigned long long)ticks_read + (unsigned long long)pending,
	    (long long)oneshot_armed, (long long)oneshot_fired, (long long)abs_target, (long long)abs_fired);
}

static void waiter(void)
{
	tree_member_signals();
	my_ids = ids_now();
	waiter_setup();
	tree_say_to_root("UP waiter %d", (int)getpid());
	for (;;) {
		tree_member_service("waiter", waiter_check);
		if (term_requested)
			_exit(0);
		waiter_wait(-1);
	}
}

static long long kv_field(const char *kv, const char *key)
{
	const char *p = strstr(kv, key);
	return p ? strtoll(p + strlen(key), NULL, 10) : -1;
}

int main(int argc, char **argv)
{
	struct opts o;
	while (argc > 1) {
		if (strcmp(argv[1], "--single") == 0) {
			single = 1;
			argv[1] = argv[0];
			argc--;
			argv++;
		} else if (argc > 2 && strcmp(argv[1], "--oneshot-ms") == 0) {
			oneshot_ms = atol(argv[2]);
			argv[2] = argv[0];
			argc -= 2;
			argv += 2;
		} else
			break;
	}
	parse_opts(argc, argv, &o);
	tree_root_signals();
	my_ids = ids_now();
	ticks_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	acc_fd = eventfd(1000, EFD_CLOEXEC);
	if (ticks_fd < 0 || acc_fd < 0)
		die("eventfd");
	tree_add("root", getpid(), 0);
	pid_t wpid = 0;
	if (single) {
		waiter_setup();
	} else {
		tree_report_pipe();
		wpid = fork();
		if (wpid < 0)
			die("fork");
		if (wpid == 0) {
			close(rep_rd);
			waiter();
		}
		close(rep_wr);
		tree_add("waiter", wpid, 1);
		char line[PIPE_BUF + 1];
		if (tree_read_line(line, sizeof(line), mono_now() + 10) || strncmp(line, "UP ", 3) != 0)
			die("the waiter did not come up");
	}
	struct verdict v0 = {0};
	check_clocks(&v0, &clk, "root");
	tree_say_procs();
	say("READY %d", (int)getpid());

	int handled = 0, seq = 0;
	int64_t next_tick = now_ns(CLOCK_MONOTONIC);
	for (;;) {
		if (term_requested) {
			int ended = single ? 0 : end_children(&wpid, 1);
			say("EXIT %d children_ended=%d", o.exit_code, ended);
			exit(o.exit_code);
		}
		if (usr1_count != handled) {
			handled = usr1_count;
			seq++;
			struct verdict v = {0};
			char kv[4096] = "";
			if (latched_set)
				vfail(&v, "%s", latched);
			check_ids(&v, "root", my_ids);
			uint64_t one = 1;
			if (write(acc_fd, &one, 8) != 8)
				vfail(&v, "write eventfd acc: %s", strerror(errno));
			if (single)
				waiter_check(seq, &v, kv, sizeof(kv));
			else
				tree_collect(seq, &v, kv, sizeof(kv));
			long long t = kv_field(kv, "ticks=");
			if (!v.failed && t != (long long)ticks_written)
				vfail(&v, "eventfd ticks: %lld read or pending, %llu written", t,
				      (unsigned long long)ticks_written);
			if (v.failed)
				say("CHECK %d FAIL %s", seq, v.why);
			else
				say("CHECK %d OK progress=%llu %s", seq, (unsigned long long)ticks_written, kv);
		}
		int64_t now = now_ns(CLOCK_MONOTONIC);
		if (now >= next_tick) {
			uint64_t one = 1;
			if (write(ticks_fd, &one, 8) == 8)
				ticks_written++;
			next_tick += 20000000LL;
			if (next_tick < now)
				next_tick = now + 20000000LL;
		}
		if (single)
			waiter_wait(5);
		else
			sleep_ms(5);
	}
}
