/*
 * tree_prefork.c - a pre-forked server on a unix socket.
 *
 * Usage: tree_prefork --socket PATH [--workers N]
 *
 * The root binds and listens on a SOCK_STREAM unix socket at PATH, then
 * forks N workers (roles worker1..workerN) that all accept on that one
 * listening socket (one open file description, inherited) and a prober
 * (role prober), a client inside the tree. A worker answers each
 * connection's request "<n>\n" with "<n> <n*n mod 1000003> <its pid>\n"
 * and closes it. The prober connects every 2 ms and checks each answer;
 * any failure (a refused or reset connection, a wrong answer, an unknown
 * worker) fails the next check. Connections between the prober and the
 * workers are in flight when the tree is frozen: queued in the listener's
 * backlog, or accepted with the request unread.
 *
 * Each process checks its PID, parent, process group and session and that
 * its listening socket is still one (SO_ACCEPTCONN, same path).
 *
 * Protocol: tree_fixture.h; "PROC workerK <pid>" lines name the workers.
 */
#include "tree_fixture.h"

#include <sys/socket.h>
#include <sys/un.h>

#define MAXW 8

static const char *path;
static int nworkers = 3;
static int lfd = -1;
static pid_t workers[MAXW], prober_pid;
static struct ids my_ids;
static struct clockstate clk;
static char role[32] = "root";
static uint64_t progress;

static uint64_t square(uint64_t n) { return n * n % 1000003; }

static void check_listener(struct verdict *v)
{
	int acc = 0;
	socklen_t l = sizeof(acc);
	if (getsockopt(lfd, SOL_SOCKET, SO_ACCEPTCONN, &acc, &l) || !acc)
		vfail(v, "%s: fd %d is not a listening socket (%s)", role, lfd, acc ? "" : strerror(errno));
	struct sockaddr_un sa;
	l = sizeof(sa);
	memset(&sa, 0, sizeof(sa));
	if (getsockname(lfd, (struct sockaddr *)&sa, &l) || sa.sun_family != AF_UNIX ||
	    strcmp(sa.sun_path, path) != 0)
		vfail(v, "%s: listening socket bound to %s, want %s", role, sa.sun_path, path);
	check_flags(v, "listening socket", lfd, O_RDWR);
}

static void member_check(int seq, struct verdict *v, char *kv, size_t len)
{
	(void)seq;
	check_ids(v, role, my_ids);
	check_clocks(v, &clk, role);
	if (lfd >= 0)
		check_listener(v);
	kvf(kv, len, "progress=%llu", (unsigned long long)progress);
}

/* ---- a worker ------------------------------------------------------- */

/* serve answers one connection; it returns when the connection is done. */
static void serve(int c)
{
	char buf[128];
	size_t have = 0;
	while (have < sizeof(buf) - 1) {
		struct pollfd pfd = {.fd = c, .events = POLLIN};
		int r = poll(&pfd, 1, 2000);
		if (r < 0 && errno == EINTR) {
			tree_member_service(role, member_check);
			continue;
		}
		if (r <= 0)
			return; /* a silent client */
		ssize_t n = read(c, buf + have, sizeof(buf) - 1 - have);
		if (n <= 0)
			return;
		have += (size_t)n;
		if (memchr(buf, '\n', have))
			break;
	}
	buf[have] = 0;
	unsigned long long n = strtoull(buf, NULL, 10);
	char out[128];
	int len = snprintf(out, sizeof(out), "%llu %llu %d\n", n, (unsigned long long)square(n), (int)getpid());
	write_all(c, out, (size_t)len);
	progress++;
}

static void worker(void)
{
	tree_member_signals();
	my_ids = ids_now();
	tree_say_to_root("UP %s %d", role, (int)getpid());
	for (;;) {
		tree_member_service(role, member_check);
		if (term_requested)
			_exit(0);
		int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
		if (c < 0) {
			if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED) {
				latch("%s: accept: %s", role, strerror(errno));
				sleep_ms(10);
			}
			continue;
		}
		serve(c);
		close(c);
	}
}

/* ---- the prober ----------------------------------------------------- */

static int known_worker(pid_t pid)
{
	for (int i = 0; i < nworkers; i++)
		if (workers[i] == pid)
			return 1;
	return 0;
}

static void probe_once(uint64_t n)
{
	int c = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (c < 0) {
		latch("prober: socket: %s", strerror(errno));
		return;
	}
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	int r;
	do
		r = connect(c, (struct sockaddr *)&sa, sizeof(sa));
	while (r < 0 && errno == EINTR);
	if (r < 0) {
		latch("prober: request %llu: connect: %s", (unsigned long long)n, strerror(errno));
		close(c);
		return;
	}
	char req[32];
	int len = snprintf(req, sizeof(req), "%llu\n", (unsigned long long)n);
	write_all(c, req, (size_t)len);
	char buf[128];
	size_t have = 0;
	double deadline = mono_now() + 10;
	while (have < sizeof(buf) - 1 && !memchr(buf, '\n', have)) {
		ssize_t got = read(c, buf + have, sizeof(buf) - 1 - have);
		if (got < 0 && errno == EINTR) {
			tree_member_service(role, member_check);
			if (mono_now() < deadline)
				continue;
		}
		if (got <= 0) {
			latch("prober: request %llu: %s after %zu bytes of the answer", (unsigned long long)n,
			      got < 0 ? strerror(errno) : "end of file", have);
			close(c);
			return;
		}
		have += (size_t)got;
	}
	close(c);
	buf[have] = 0;
	unsigned long long an, asq;
	int apid;
	if (sscanf(buf, "%llu %llu %d", &an, &asq, &apid) != 3 || an != n || asq != square(n)) {
		latch("prober: request %llu: answer %s", (unsigned long long)n, buf);
		return;
	}
	if (!known_worker(apid)) {
		latch("prober: request %llu: answered by %d, not a worker", (unsigned long long)n, apid);
		return;
	}
	progress++;
}

static void prober(void)
{
	tree_member_signals();
	my_ids = ids_now();
	tree_say_to_root("UP prober %d", (int)getpid());
	for (uint64_t n = 1;; n++) {
		tree_member_service(role, member_check);
		if (term_requested)
			_exit(0);
		probe_once(n);
		sleep_ms(2);
	}
}

/* ---- the root --------------------------------------------------------- */

int main(int argc, char **argv)
{
	struct opts o;
	/* Our options first, then fixture.h's. */
	while (argc > 2) {
		if (strcmp(argv[1], "--socket") == 0)
			path = argv[2];
		else if (strcmp(argv[1], "--workers") == 0)
			nworkers = atoi(argv[2]);
		else
			break;
		argv[2] = argv[0];
		argc -= 2;
		argv += 2;
	}
	parse_opts(argc, argv, &o);
	if (!path || nworkers < 1 || nworkers > MAXW || strlen(path) >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
		say("SETUP FAIL usage: tree_prefork --socket PATH [--workers 1..%d]", MAXW);
		return 2;
	}
	tree_root_signals();
	my_ids = ids_now();
	tree_report_pipe();
	unlink(path);
	lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) || listen(lfd, 64))
		die("listen on %s", path);
	tree_add("root", getpid(), 0);
	for (int i = 0; i < nworkers; i++) {
		workers[i] = fork();
		if (workers[i] < 0)
			die("fork worker");
		if (workers[i] == 0) {
			close(rep_rd);
			snprintf(role, sizeof(role), "worker%d", i + 1);
			worker();
		}
		char r[32];
		snprintf(r, sizeof(r), "worker%d", i + 1);
		tree_add(r, workers[i], 1);
	}
	prober_pid = fork();
	if (prober_pid < 0)
		die("fork prober");
	if (prober_pid == 0) {
		close(rep_rd);
		close(lfd);
		lfd = -1;
		snprintf(role, sizeof(role), "prober");
		prober();
	}
	tree_add("prober", prober_pid, 1);
	close(rep_wr);
	double deadline = mono_now() + 10;
	for (int up = 0; up < nworkers + 1;) {
		char line[PIPE_BUF + 1];
		if (tree_read_line(line, sizeof(line), deadline))
			die("the tree did not come up (%d of %d members)", up, nworkers + 1);
		if (strncmp(line, "UP ", 3) == 0)
			up++;
	}
	struct verdict v0 = {0};
	check_clocks(&v0, &clk, "root");
	tree_say_procs();
	say("READY %d", (int)getpid());

	int handled = 0, seq = 0;
	for (;;) {
		if (term_requested) {
			pid_t kids[MAXW + 1];
			for (int i = 0; i < nworkers; i++)
				kids[i] = workers[i];
			kids[nworkers] = prober_pid;
			int ended = end_children(kids, nworkers + 1);
			unlink(path);
			say("EXIT %d children_ended=%d", o.exit_code, ended);
			exit(o.exit_code);
		}
		if (usr1_count != handled) {
			handled = usr1_count;
			tree_root_check(++seq, member_check);
		}
		progress++;
		sleep_ms(5);
	}
}
