/*
 * tree_fixture.h - the fixture protocol (fixture.h) for a tree of processes.
 *
 * The root speaks the protocol with the test: it prints "PROC <role> <pid>"
 * for every process of the tree (itself included) before "READY <pid>", and
 * answers each SIGUSR1 with one CHECK line that covers the whole tree.
 *
 * To check the tree, the root sends SIGUSR1 with the check's sequence number
 * (sigqueue) to every other member and waits for their reports on the
 * report pipe, a pipe every member inherits: one line per member and check,
 * "R <role> <seq> OK <key=value...>" or "R <role> <seq> FAIL <reason>", in a
 * single write (shorter than PIPE_BUF, so lines never interleave). The CHECK
 * line carries each member's values as "<role>_<key>=<value>"; a missing or
 * failed report fails the check.
 *
 * Members install SIGUSR1 without SA_RESTART: a blocking call returns EINTR
 * and the member goes back to its loop, where tree_member_service() answers.
 *
 * On SIGTERM every process ends its own children (SIGTERM, then waits for
 * them) before it exits; the root prints "EXIT <status> ..." last.
 */
#ifndef PHAUL_TREE_FIXTURE_H
#define PHAUL_TREE_FIXTURE_H

#include "fixture.h"

#include <poll.h>
#include <sys/wait.h>

#define TREE_MAX 32

struct tree_member {
	char role[32];
	pid_t pid;
	int checked; /* the root asks it for reports (zombies are not asked) */
};

static struct tree_member tree[TREE_MAX];
static int ntree;
static int rep_rd = -1, rep_wr = -1; /* the report pipe */

/* What a member was asked to check: the sequence number of the last request. */
static volatile sig_atomic_t member_req;
static int member_done;

static inline void tree_add(const char *role, pid_t pid, int checked)
{
	if (ntree >= TREE_MAX)
		return;
	snprintf(tree[ntree].role, sizeof(tree[ntree].role), "%s", role);
	tree[ntree].pid = pid;
	tree[ntree].checked = checked;
	ntree++;
}

/* tree_report_pipe creates the report pipe; call it before the first fork. */
static inline void tree_report_pipe(void)
{
	int p[2];
	if (pipe2(p, O_CLOEXEC))
		die("pipe2 (report pipe)");
	rep_rd = p[0];
	rep_wr = p[1];
}

static inline void on_usr1_member(int sig, siginfo_t *si, void *uc)
{
	(void)sig;
	(void)uc;
	member_req = si->si_value.sival_int;
}

/*
 * tree_member_signals installs the handlers of a member (any process but the
 * root): SIGUSR1 carries a check request, SIGTERM asks it to end. Neither
 * restarts system calls.
 */
static inline void tree_member_signals(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_usr1_member;
	sa.sa_flags = SA_SIGINFO;
	sigaction(SIGUSR1, &sa, NULL);
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_term;
	sigaction(SIGTERM, &sa, NULL);
}

/* tree_root_signals installs the root's handlers (SIGUSR1 from the test). */
static inline void tree_root_signals(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sigaction(SIGUSR1, &sa, NULL);
	sa.sa_handler = on_term;
	sigaction(SIGTERM, &sa, NULL);
}

/* tree_say_to_root sends one line to the root over the report pipe. */
__attribute__((format(printf, 1, 2))) static inline void tree_say_to_root(const char *fmt, ...)
{
	char buf[PIPE_BUF];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n > sizeof(buf) - 2)
		n = (int)sizeof(buf) - 2;
	for (int i = 0; i < n; i++)
		if (buf[i] == '\n')
			buf[i] = ' ';
	buf[n++] = '\n';
	write_all(rep_wr, buf, (size_t)n);
}

/*
 * tree_member_service answers a pending check request of the root with
 * check(), which fills v and writes its key=value words into kv.
 */
static inline void tree_member_service(const char *role, void (*check)(int seq, struct verdict *v, char *kv, size_t len))
{
	int req = member_req;
	if (req == member_done)
		return;
	member_done = req;
	struct verdict v = {0};
	char kv[2048] = "";
	if (latched_set)
		vfail(&v, "%s", latched);
	check(req, &v, kv, sizeof(kv));
	if (v.failed)
		tree_say_to_root("R %s %d FAIL %s", role, req, v.why);
	else
		tree_say_to_root("R %s %d OK %s", role, req, kv);
}

/* kvf appends formatted key=value words to kv. */
__attribute__((format(printf, 3, 4))) static inline void kvf(char *kv, size_t len, const char *fmt, ...)
{
	size_t used = strlen(kv);
	if (used + 2 >= len)
		return;
	if (used > 0)
		kv[used++] = ' ';
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(kv + used, len - used, fmt, ap);
	va_end(ap);
}

/*
 * tree_read_line reads one line of the report pipe into line, waiting until
 * deadline (CLOCK_MONOTONIC seconds). It returns 0 on success.
 */
static inline int tree_read_line(char *line, size_t len, double deadline)
{
	static char buf[16384];
	static size_t have;
	for (;;) {
		char *nl = memchr(buf, '\n', have);
		if (nl) {
			size_t n = (size_t)(nl - buf);
			size_t c = n < len - 1 ? n : len - 1;
			memcpy(line, buf, c);
			line[c] = 0;
			memmove(buf, nl + 1, have - n - 1);
			have -= n + 1;
			return 0;
		}
		if (have == sizeof(buf))
			have = 0; /* a line longer than the buffer: drop it */
		struct timespec now;
		clock_gettime(CLOCK_MONOTONIC, &now);
		double left = deadline - ts_sec(now);
		if (left <= 0)
			return -1;
		struct pollfd pfd = {.fd = rep_rd, .events = POLLIN};
		int r = poll(&pfd, 1, (int)(left * 1000) + 1);
		if (r < 0 && errno != EINTR)
			return -1;
		if (r <= 0)
			continue;
		ssize_t got = read(rep_rd, buf + have, sizeof(buf) - have);
		if (got < 0 && errno != EINTR && errno != EAGAIN)
			return -1;
		if (got > 0)
			have += (size_t)got;
	}
}

static inline double mono_now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return ts_sec(t);
}

/* proc_state returns the state letter of /proc/PID/stat (0 if there is none). */
static inline char proc_state(pid_t pid)
{
	char path[64], buf[512];
	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = 0;
	char *rp = strrchr(buf, ')');
	return rp && rp[1] == ' ' ? rp[2] : 0;
}

/*
 * tree_collect asks every checked member for check seq and adds their
 * verdicts to v and their values to kv (as role_key=value). Other lines on
 * the report pipe (late answers to earlier checks) are skipped.
 */
static inline void tree_collect(int seq, struct verdict *v, char *kv, size_t len)
{
	int want = 0, got = 0;
	int answered[TREE_MAX] = {0};
	for (int i = 0; i < ntree; i++) {
		if (!tree[i].checked || tree[i].pid == getpid())
			continue;
		char state = proc_state(tree[i].pid);
		if (state == 0 || state == 'Z' || state == 'X') {
			vfail(v, "%s %d is gone", tree[i].role, (int)tree[i].pid);
			answered[i] = 1;
			continue;
		}
		union sigval val = {.sival_int = seq};
		if (sigqueue(tree[i].pid, SIGUSR1, val)) {
			vfail(v, "sigqueue(%s %d): %s", tree[i].role, (int)tree[i].pid, strerror(errno));
			answered[i] = 1;
			continue;
		}
		want++;
	}
	double deadline = mono_now() + 5;
	while (got < want) {
		char line[PIPE_BUF + 1];
		if (tree_read_line(line, sizeof(line), deadline)) {
			for (int i = 0; i < ntree; i++)
				if (tree[i].checked && tree[i].pid != getpid() && !answered[i])
					vfail(v, "%s %d: no report for check %d within 5s", tree[i].role, (int)tree[i].pid,
					      seq);
			return;
		}
		char role[64], verdict[8];
		int rseq, off = 0;
		if (sscanf(line, "R %63s %d %7s %n", role, &rseq, verdict, &off) < 3 || rseq != seq)
			continue;
		int idx = -1;
		for (int i = 0; i < ntree; i++)
			if (strcmp(tree[i].role, role) == 0)
				idx = i;
		if (idx < 0 || answered[idx])
			continue;
		answered[idx] = 1;
		got++;
		const char *rest = off > 0 ? line + off : "";
		if (strcmp(verdict, "OK") != 0) {
			vfail(v, "%s: %s", role, rest);
			continue;
		}
		/* Prefix each word with the role. */
		char copy[PIPE_BUF + 1];
		snprintf(copy, sizeof(copy), "%s", rest);
		for (char *save = NULL, *w = strtok_r(copy, " ", &save); w; w = strtok_r(NULL, " ", &save))
			kvf(kv, len, "%s_%s", role, w);
	}
}

/*
 * tree_root_check runs check seq from the root: the root's own (member),
 * every checked member's through tree_collect, and prints the CHECK line.
 */
static inline void tree_root_check(int seq, void (*member)(int, struct verdict *, char *, size_t))
{
	struct verdict v = {0};
	char kv[4096] = "";
	if (latched_set)
		vfail(&v, "%s", latched);
	member(seq, &v, kv, sizeof(kv));
	tree_collect(seq, &v, kv, sizeof(kv));
	if (v.failed)
		say("CHECK %d FAIL %s", seq, v.why);
	else
		say("CHECK %d OK %s", seq, kv);
}

/* tree_say_procs prints the PROC lines of the tree. */
static inline void tree_say_procs(void)
{
	for (int i = 0; i < ntree; i++)
		say("PROC %s %d", tree[i].role, (int)tree[i].pid);
}

/*
 * wait_zombie waits until pid (a child) is a zombie, without reaping it.
 */
static inline void wait_zombie(pid_t pid)
{
	for (int i = 0; i < 5000; i++) {
		siginfo_t si;
		memset(&si, 0, sizeof(si));
		if (waitid(P_PID, (id_t)pid, &si, WEXITED | WNOHANG | WNOWAIT) == 0 && si.si_pid == pid)
			return;
		sleep_ms(1);
	}
	die("child %d did not exit", (int)pid);
}

/*
 * end_children sends SIGTERM to each listed child and reaps it (SIGKILL
 * after 5 s). It returns how many ended.
 */
static inline int end_children(const pid_t *pids, int n)
{
	int ended = 0;
	for (int i = 0; i < n; i++)
		if (pids[i] > 0)
			kill(pids[i], SIGTERM);
	for (int i = 0; i < n; i++) {
		if (pids[i] <= 0)
			continue;
		for (int t = 0;; t++) {
			int st;
			pid_t w = waitpid(pids[i], &st, WNOHANG);
			if (w == pids[i] || (w < 0 && errno != EINTR)) {
				ended += w == pids[i];
				break;
			}
			if (t == 5000)
				kill(pids[i], SIGKILL);
			sleep_ms(1);
		}
	}
	return ended;
}

/* same_ids compares pid, ppid, pgid and sid with what was recorded. */
struct ids {
	pid_t pid, ppid, pgid, sid;
};

static inline struct ids ids_now(void)
{
	struct ids i = {(pid_t)syscall(SYS_getpid), (pid_t)syscall(SYS_getppid), getpgid(0), getsid(0)};
	return i;
}

static inline void check_ids(struct verdict *v, const char *who, struct ids want)
{
	struct ids got = ids_now();
	if (got.pid != want.pid)
		vfail(v, "%s: getpid()=%d, want %d", who, (int)got.pid, (int)want.pid);
	if (got.ppid != want.ppid)
		vfail(v, "%s: getppid()=%d, want %d", who, (int)got.ppid, (int)want.ppid);
	if (got.pgid != want.pgid)
		vfail(v, "%s: getpgid()=%d, want %d", who, (int)got.pgid, (int)want.pgid);
	if (got.sid != want.sid)
		vfail(v, "%s: getsid()=%d, want %d", who, (int)got.sid, (int)want.sid);
}

/* check_flags compares the status flags of fd (F_GETFL) with want. */
static inline void check_flags(struct verdict *v, const char *what, int fd, int want)
{
	int fl = fcntl(fd, F_GETFL);
	if (fl < 0)
		vfail(v, "%s (fd %d): F_GETFL: %s", what, fd, strerror(errno));
	else if ((fl & (O_ACCMODE | O_NONBLOCK | O_APPEND)) != want)
		vfail(v, "%s (fd %d): flags %#o, want %#o", what, fd, fl & (O_ACCMODE | O_NONBLOCK | O_APPEND),
		      want);
}

#endif /* PHAUL_TREE_FIXTURE_H */
