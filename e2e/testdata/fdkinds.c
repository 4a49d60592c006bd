/*
 * fdkinds.c - a workload that waits in epoll on an eventfd, timerfds, a
 * signalfd and an inotify instance, and checks after restore that each of
 * them still works and kept its state.
 *
 *   eventfd     each check writes its sequence number; the main loop reads
 *               it through epoll; the next check wants the sum of them all.
 *   periodic    CLOCK_MONOTONIC timerfd, 100 ms period, non-blocking: the
 *               expirations read must match the time since it was armed
 *               (the ones missed while the process was frozen or away
 *               included), and each read must come soon after an expiry.
 *   one-shot    CLOCK_BOOTTIME timerfd, blocking, armed by check 1 for
 *               --oneshot-ms (default 2000): reports when it fired, in
 *               CLOCK_REALTIME ns (oneshot_armed=, oneshot_fired=); firing
 *               early is a failure.
 *   absolute    CLOCK_REALTIME timerfd with TFD_TIMER_ABSTIME and
 *               TFD_TIMER_CANCEL_ON_SET, armed by check 1 for --oneshot-ms
 *               + 500 ms: the same, as abs_target= and abs_fired=.
 *   signalfd    SIGUSR2 (blocked): counts what it reads (sigs=, sigpid=).
 *   inotify     watches --dir/a (wd 1) and --dir/b (wd 3; wd 2, on
 *               --dir/gone, is removed at setup), plus --watch-file PATH
 *               when given (wd 4): reports the last event (ino_wd=,
 *               ino_name=) and fails on an event for an unknown watch.
 *
 * --pending-inotify 1 leaves the inotify instance out of epoll and queues
 * an event on it at setup: a dump must refuse it.
 *
 * Build: gcc -O2 -Wall fdkinds.c -o fdkinds
 * Protocol: see fixture.h.
 */
#include "fixture.h"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>

#define PERIOD_NS 100000000LL
#define NS 1000000000LL

enum { TAG_EVENT = 1, TAG_PERIODIC, TAG_ONESHOT, TAG_ABS, TAG_SIGNAL, TAG_INOTIFY };

static int exit_code = 7;
static const char *dir;
static const char *watch_file;
static long oneshot_ms = 2000;
static int pending_inotify;

static int ep, efd, ptfd, otfd, atfd, sfd, ifd;
static int wd_a, wd_gone, wd_b, wd_file;
static int64_t periodic_start; /* CLOCK_MONOTONIC ns */
static uint64_t ptick_total;
static int64_t plate_max; /* worst lateness of a periodic read since the last check, ns */
static uint64_t ev_sum, ev_written;
static int64_t oneshot_armed, oneshot_armed_boot, oneshot_fired, oneshot_fired_boot; /* ns */
static uint64_t oneshot_ticks;
static int64_t abs_target, abs_fired;
static uint64_t abs_ticks;
static int sigs, sigpid;
static int ino_events, ino_last_wd, gone_ignored;
static char ino_last_name[256];
static uint64_t progress, last_progress;

static int64_t now_ns(clockid_t c)
{
	struct timespec ts;
	clock_gettime(c, &ts);
	return (int64_t)ts.tv_sec * NS + ts.tv_nsec;
}

static void add(int fd, int tag)
{
	struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)tag};
	if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev))
		die("epoll_ctl %d", tag);
}

static void parse_args(int argc, char **argv)
{
	for (int i = 1; i + 1 < argc; i += 2) {
		const char *a = argv[i], *v = argv[i + 1];
		if (strcmp(a, "--dir") == 0)
			dir = v;
		else if (strcmp(a, "--watch-file") == 0)
			watch_file = v;
		else if (strcmp(a, "--oneshot-ms") == 0)
			oneshot_ms = atol(v);
		else if (strcmp(a, "--pending-inotify") == 0)
			pending_inotify = atoi(v);
		else if (strcmp(a, "--exit-code") == 0)
			exit_code = atoi(v);
		else {
			say("SETUP FAIL unknown option %s", a);
			exit(2);
		}
	}
	if (argc % 2 == 0) {
		say("SETUP FAIL option %s needs a value", argv[argc - 1]);
		exit(2);
	}
	if (!dir) {
		say("SETUP FAIL --dir is required");
		exit(2);
	}
}

static int watch(const char *name, uint32_t mask)
{
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	int wd = inotify_add_watch(ifd, path, mask);
	if (wd < 0)
		die("inotify_add_watch %.900s", path);
	return wd;
}

static void setup(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);
	sa.sa_handler = on_term;
	sigaction(SIGTERM, &sa, NULL);
	sigset_t m;
	sigemptyset(&m);
	sigaddset(&m, SIGUSR2);
	if (sigprocmask(SIG_BLOCK, &m, NULL))
		die("sigprocmask");

	if ((ep = epoll_create1(EPOLL_CLOEXEC)) < 0)
		die("epoll_create1");
	if ((efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0)
		die("eventfd");
	add(efd, TAG_EVENT);

	if ((ptfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)) < 0)
		die("timerfd_create periodic");
	struct itimerspec its = {.it_interval = {0, PERIOD_NS}, .it_value = {0, PERIOD_NS}};
	periodic_start = now_ns(CLOCK_MONOTONIC);
	if (timerfd_settime(ptfd, 0, &its, NULL))
		die("timerfd_settime periodic");
	add(ptfd, TAG_PERIODIC);

	if ((otfd = timerfd_create(CLOCK_BOOTTIME, 0)) < 0)
		die("timerfd_create one-shot");
	add(otfd, TAG_ONESHOT);
	if ((atfd = timerfd_create(CLOCK_REALTIME, TFD_NONBLOCK)) < 0)
		die("timerfd_create absolute");
	add(atfd, TAG_ABS);

	if ((sfd = signalfd(-1, &m, SFD_NONBLOCK | SFD_CLOEXEC)) < 0)
		die("signalfd");
	add(sfd, TAG_SIGNAL);

	if ((ifd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC)) < 0)
		die("inotify_init1");
	wd_a = watch("a", IN_CREATE | IN_DELETE);
	wd_gone = watch("gone", IN_CREATE);
	wd_b = watch("b", IN_CREATE | IN_MOVED_TO | IN_ONLYDIR);
	if (inotify_rm_watch(ifd, wd_gone))
		die("inotify_rm_watch");
	if (watch_file) {
		wd_file = inotify_add_watch(ifd, watch_file, IN_MODIFY | IN_ATTRIB);
		if (wd_file < 0)
			die("inotify_add_watch %.900s", watch_file);
	}
	if (pending_inotify) {
		char path[PATH_MAX];
		snprintf(path, sizeof(path), "%s/a/pending", dir);
		int fd = open(path, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
		if (fd < 0)
			die("create %.900s", path);
		close(fd);
	} else {
		add(ifd, TAG_INOTIFY);
	}
}

static uint64_t read_u64(int fd, const char *what)
{
	uint64_t v = 0;
	ssize_t n = read(fd, &v, sizeof(v));
	if (n != sizeof(v) && !(n < 0 && errno == EAGAIN))
		latch("%s: read returned %zd (%s)", what, n, strerror(errno));
	return n == sizeof(v) ? v : 0;
}

static void on_periodic(void)
{
	uint64_t t = read_u64(ptfd, "periodic timerfd");
	if (t == 0)
		return;
	ptick_total += t;
	int64_t since = now_ns(CLOCK_MONOTONIC) - periodic_start;
	int64_t late = since - (int64_t)ptick_total * PERIOD_NS;
	if (late < -1000000)
		latch("periodic timerfd: %llu expirations %.3f s after it was armed: %.1f ms too many",
		      (unsigned long long)ptick_total, (double)since / NS, (double)-late / 1e6);
	if (late > plate_max)
		plate_max = late;
}

static void on_inotify(void)
{
	char buf[4096] __attribute__((aligned(8)));
	for (;;) {
		ssize_t n = read(ifd, buf, sizeof(buf));
		if (n <= 0)
			return;
		for (char *p = buf; p < buf + n;) {
			struct inotify_event *e = (struct inotify_event *)p;
			p += sizeof(*e) + e->len;
			if (e->wd == wd_gone && (e->mask & IN_IGNORED) && !gone_ignored) {
				gone_ignored = 1;
				continue;
			}
			if (e->wd != wd_a && e->wd != wd_b && (wd_file == 0 || e->wd != wd_file)) {
				latch("inotify: event %#x for unknown watch %d (%s)", e->mask, e->wd,
				      e->len ? e->name : "");
				continue;
			}
			ino_events++;
			ino_last_wd = e->wd;
			snprintf(ino_last_name, sizeof(ino_last_name), "%s", e->len ? e->name : "-");
		}
	}
}

static void on_signal(void)
{
	struct signalfd_siginfo si;
	while (read(sfd, &si, sizeof(si)) == sizeof(si)) {
		if (si.ssi_signo != SIGUSR2)
			latch("signalfd: signal %u, want SIGUSR2", si.ssi_signo);
		sigs++;
		sigpid = (int)si.ssi_pid;
	}
}

static void check_fd(struct verdict *v, int fd, const char *want)
{
	char buf[PATH_MAX];
	if (strcmp(fd_target(fd, buf, sizeof(buf)), want) != 0)
		vfail(v, "fd %d: %s, want %s", fd, buf, want);
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
	check_fd(&v, efd, "anon_inode:[eventfd]");
	check_fd(&v, ptfd, "anon_inode:[timerfd]");
	check_fd(&v, otfd, "anon_inode:[timerfd]");
	check_fd(&v, sfd, "anon_inode:[signalfd]");
	check_fd(&v, ifd, "anon_inode:inotify");
	if (fcntl(otfd, F_GETFL) & O_NONBLOCK)
		vfail(&v, "one-shot timerfd became non-blocking");
	if (!(fcntl(ptfd, F_GETFL) & O_NONBLOCK) || !(fcntl(ptfd, F_GETFD) & FD_CLOEXEC))
		vfail(&v, "periodic timerfd lost O_NONBLOCK or FD_CLOEXEC");
	if (fcntl(otfd, F_GETFD) & FD_CLOEXEC)
		vfail(&v, "one-shot timerfd became close-on-exec");

	/* eventfd: everything the earlier checks wrote was read via epoll. */
	if (ev_sum != ev_written)
		vfail(&v, "eventfd: read %llu, the checks wrote %llu", (unsigned long long)ev_sum,
		      (unsigned long long)ev_written);

	/* periodic timer: expirations read vs. time since it was armed. */
	int64_t since = now_ns(CLOCK_MONOTONIC) - periodic_start;
	int64_t due = since / PERIOD_NS;
	if ((int64_t)ptick_total > due || (int64_t)ptick_total < due - 2)
		vfail(&v, "periodic timerfd: %llu expirations read %.3f s after it was armed, want %lld",
		      (unsigned long long)ptick_total, (double)since / NS, (long long)due);
	if (plate_max > PERIOD_NS + 150000000LL)
		vfail(&v, "periodic timerfd: a read came %.1f ms after its expiry (expirations lost?)",
		      (double)plate_max / 1e6);
	struct itimerspec cur;
	if (timerfd_gettime(ptfd, &cur) || cur.it_interval.tv_sec != 0 || cur.it_interval.tv_nsec != PERIOD_NS)
		vfail(&v, "periodic timerfd: interval %ld.%09ld", (long)cur.it_interval.tv_sec,
		      (long)cur.it_interval.tv_nsec);

	/* one-shot timers: never early, and fired in time. */
	if (oneshot_fired) {
		int64_t took = oneshot_fired_boot - oneshot_armed_boot;
		if (took < oneshot_ms * 1000000LL - 1000000)
			vfail(&v, "one-shot timerfd fired after %.3f s, armed for %.3f s", (double)took / NS,
			      (double)oneshot_ms / 1000);
		if (oneshot_ticks != 1)
			vfail(&v, "one-shot timerfd: %llu expirations", (unsigned long long)oneshot_ticks);
	} else if (oneshot_armed && now_ns(CLOCK_BOOTTIME) - oneshot_armed_boot > (oneshot_ms + 30000) * 1000000LL) {
		vfail(&v, "one-shot timerfd did not fire");
	}
	if (abs_fired && (abs_fired < abs_target || abs_ticks != 1))
		vfail(&v, "absolute timerfd fired %.3f s before its time, %llu expirations",
		      (double)(abs_target - abs_fired) / NS, (unsigned long long)abs_ticks);

	/* Check 1 arms the one-shot timers (and reports when). */
	if (seq == 1) {
		struct itimerspec its = {.it_value = {oneshot_ms / 1000, (oneshot_ms % 1000) * 1000000}};
		oneshot_armed = now_ns(CLOCK_REALTIME);
		oneshot_armed_boot = now_ns(CLOCK_BOOTTIME);
		if (timerfd_settime(otfd, 0, &its, NULL))
			latch("timerfd_settime one-shot: %s", strerror(errno));
		abs_target = oneshot_armed + (oneshot_ms + 500) * 1000000LL;
		struct itimerspec at = {.it_value = {abs_target / NS, abs_target % NS}};
		if (timerfd_settime(atfd, TFD_TIMER_ABSTIME | TFD_TIMER_CANCEL_ON_SET, &at, NULL))
			latch("timerfd_settime absolute: %s", strerror(errno));
	}
	if (v.failed)
		say("CHECK %d FAIL %s", seq, v.why);
	else
		say("CHECK %d OK progress=%llu ev=%llu ptick=%llu plate_ms=%lld oneshot_armed=%lld oneshot_fired=%lld "
		    "abs_target=%lld abs_fired=%lld sigs=%d sigpid=%d ino_events=%d ino_wd=%d ino_name=%s "
		    "wd_a=%d wd_b=%d wd_file=%d",
		    seq, (unsigned long long)progress, (unsigned long long)ev_sum, (unsigned long long)ptick_total,
		    (long long)(plate_max / 1000000), (long long)oneshot_armed, (long long)oneshot_fired,
		    (long long)abs_target, (long long)abs_fired, sigs, sigpid, ino_events, ino_last_wd,
		    ino_last_name[0] ? ino_last_name : "-", wd_a, wd_b, wd_file);
	plate_max = 0;

	uint64_t w = (uint64_t)seq;
	if (write(efd, &w, sizeof(w)) != sizeof(w))
		latch("eventfd write: %s", strerror(errno));
	ev_written += w;
}

int main(int argc, char **argv)
{
	parse_args(argc, argv);
	setup();
	say("READY %d", (int)getpid());
	int handled = 0, seq = 0;
	for (;;) {
		if (term_requested) {
			say("EXIT %d progress=%llu%s%s", exit_code, (unsigned long long)progress,
			    latched_set ? " latched=" : "", latched_set ? latched : "");
			exit(exit_code);
		}
		if (usr1_count != handled) {
			handled = usr1_count;
			seq++;
			do_check(seq);
		}
		struct epoll_event evs[8];
		int n = epoll_wait(ep, evs, 8, 1000);
		if (n < 0 && errno != EINTR)
			latch("epoll_wait: %s", strerror(errno));
		for (int i = 0; i < n; i++) {
			switch (evs[i].data.u64) {
			case TAG_EVENT:
				ev_sum += read_u64(efd, "eventfd");
				break;
			case TAG_PERIODIC:
				on_periodic();
				break;
			case TAG_ONESHOT:
				oneshot_ticks += read_u64(otfd, "one-shot timerfd");
				oneshot_fired = now_ns(CLOCK_REALTIME);
				oneshot_fired_boot = now_ns(CLOCK_BOOTTIME);
				break;
			case TAG_ABS:
				abs_ticks += read_u64(atfd, "absolute timerfd");
				abs_fired = now_ns(CLOCK_REALTIME);
				break;
			case TAG_SIGNAL:
				on_signal();
				break;
			case TAG_INOTIFY:
				on_inotify();
				break;
			default:
				latch("epoll: unknown data %llu", (unsigned long long)evs[i].data.u64);
			}
		}
		progress++;
	}
}
