/*
 * tree_pipe.c - a process tree streaming numbered records through pipes.
 *
 *   root (pgid = its own, the test's session)
 *    |- zombie-exit     exited with status 42, never reaped
 *    |- zombie-signal   killed by SIGUSR2, never reaped
 *    `- child           setpgid(0, 0): leader of a new process group
 *        |- grandchild  setpgid(0, child): joins the child's group
 *        `- session     setsid(): leader of a new session
 *
 * The grandchild writes records {seq, mix64(seq)} into pipe 1 (its write end
 * is O_NONBLOCK: it waits in poll when the pipe is full), the child reads
 * them (blocking read end), checks that none is missing or repeated and
 * passes them on through pipe 2 (blocking write end) to the root (both
 * after a poll of at most 100 ms, see ready), which
 * checks them again (O_NONBLOCK read end, read in bursts, so that both pipes
 * are full most of the time).
 *
 * The root and the child share one open file description of shared.dat
 * (opened before the fork): at check N the root finds the offset at 16(N-1),
 * writes 8 bytes, then the child finds it at 16(N-1)+8 and writes 8 bytes.
 * The child set O_NONBLOCK on that description; the root must see it. Each
 * process checks its PID, parent, process group and session, and the flags
 * of its pipe ends. The root checks its zombies with waitid(WNOWAIT) and on
 * SIGTERM reaps them: "EXIT 7 ... zombie_exit=42 zombie_signal=12".
 *
 * --single: one process writes and reads the pipe itself (what phaul could
 * dump before process trees); no children, no zombies.
 * --no-zombies: the tree without its two zombies.
 *
 * Protocol: tree_fixture.h.
 */
#include "tree_fixture.h"

#define REC 16
#define BATCH 64 /* records per write of the grandchild: 1 KiB, atomic */

static int single, no_zombies;
static int sfd = -1; /* shared.dat */
static pid_t zexit, zsig, child_pid, grandchild_pid, session_pid;
static struct ids my_ids;
static struct clockstate clk;

static void make_record(uint8_t *p, uint64_t seq)
{
	uint64_t v[2] = {seq, mix64(seq ^ 0xabcull)};
	memcpy(p, v, REC);
}

/* A stream checker: records arrive in pieces of any size. */
struct stream {
	const char *name;
	uint64_t next; /* the seq expected next */
	uint8_t carry[REC];
	size_t ncarry;
};

static void stream_feed(struct stream *s, const uint8_t *p, size_t n)
{
	while (n > 0) {
		size_t take = REC - s->ncarry;
		if (take > n)
			take = n;
		memcpy(s->carry + s->ncarry, p, take);
		s->ncarry += take;
		p += take;
		n -= take;
		if (s->ncarry < REC)
			continue;
		s->ncarry = 0;
		uint64_t v[2];
		memcpy(v, s->carry, REC);
		if (v[1] != mix64(v[0] ^ 0xabcull))
			latch("%s: record %llu is damaged (seq field %llu)", s->name, (unsigned long long)s->next,
			      (unsigned long long)v[0]);
		else if (v[0] != s->next)
			latch("%s: record %llu, want %llu (%s)", s->name, (unsigned long long)v[0],
			      (unsigned long long)s->next, v[0] < s->next ? "repeated" : "gap");
		s->next++;
	}
}

/* ---- the shared file ------------------------------------------------- */

static void shared_write(struct verdict *v, const char *who, char tag, int seq, off_t want_before)
{
	off_t off = lseek(sfd, 0, SEEK_CUR);
	if (off != want_before)
		vfail(v, "%s: shared.dat offset %lld before writing, want %lld (file description not shared?)", who,
		      (long long)off, (long long)want_before);
	char buf[9];
	snprintf(buf, sizeof(buf), "%c%07d", tag, seq);
	if (write(sfd, buf, 8) != 8)
		vfail(v, "%s: write shared.dat: %s", who, strerror(errno));
	off = lseek(sfd, 0, SEEK_CUR);
	if (off != want_before + 8)
		vfail(v, "%s: shared.dat offset %lld after writing, want %lld", who, (long long)off,
		      (long long)want_before + 8);
}

/* shared_contents checks the whole file: "P0000001C0000001P0000002...". */
static void shared_contents(struct verdict *v, int checks)
{
	static char buf[1 << 16];
	ssize_t n = pread(sfd, buf, sizeof(buf), 0);
	if (n != (ssize_t)checks * 16 && (size_t)checks * 16 <= sizeof(buf)) {
		vfail(v, "shared.dat holds %zd bytes after %d checks, want %d", n, checks, checks * 16);
		return;
	}
	for (int i = 0; i < checks && (size_t)(i + 1) * 16 <= sizeof(buf); i++) {
		char want[17];
		snprintf(want, sizeof(want), "P%07dC%07d", i + 1, i + 1);
		if (memcmp(buf + i * 16, want, 16) != 0) {
			vfail(v, "shared.dat at %d: %.16s, want %s", i * 16, buf + i * 16, want);
			return;
		}
	}
}

/* ---- the grandchild: writes pipe 1 ----------------------------------- */

static int p1w;
static uint64_t written;

static void grandchild_check(int seq, struct verdict *v, char *kv, size_t len)
{
	(void)seq;
	check_ids(v, "grandchild", my_ids);
	check_flags(v, "pipe 1 write end", p1w, O_WRONLY | O_NONBLOCK);
	check_clocks(v, &clk, "grandchild");
	kvf(kv, len, "progress=%llu", (unsigned long long)written);
}

static void grandchild(void)
{
	tree_member_signals();
	if (setpgid(0, child_pid))
		die("grandchild: setpgid(0, %d)", (int)child_pid);
	my_ids = ids_now();
	int fl = fcntl(p1w, F_GETFL);
	fcntl(p1w, F_SETFL, fl | O_NONBLOCK);
	tree_say_to_root("UP grandchild %d", (int)getpid());
	uint8_t batch[BATCH * REC];
	uint64_t next = 0;
	for (;;) {
		tree_member_service("grandchild", grandchild_check);
		if (term_requested)
			_exit(0);
		for (int i = 0; i < BATCH; i++)
			make_record(batch + i * REC, next + (uint64_t)i);
		for (;;) {
			tree_member_service("grandchild", grandchild_check);
			if (term_requested)
				_exit(0);
			ssize_t n = write(p1w, batch, sizeof(batch));
			if (n == (ssize_t)sizeof(batch))
				break;
			if (n >= 0) {
				latch("pipe 1: a non-blocking write of %zu bytes wrote %zd", sizeof(batch), n);
				break;
			}
			if (errno == EAGAIN) {
				struct pollfd pfd = {.fd = p1w, .events = POLLOUT};
				poll(&pfd, 1, 20);
			} else if (errno != EINTR) {
				latch("pipe 1: write: %s", strerror(errno));
				sleep_ms(10);
			}
		}
		next += BATCH;
		written = next;
		sleep_ms(1);
	}
}

/* ---- the session leader: idles ---------------------------------------- */

static uint64_t idle_loops;

static void session_check(int seq, struct verdict *v, char *kv, size_t len)
{
	(void)seq;
	check_ids(v, "session", my_ids);
	check_clocks(v, &clk, "session");
	kvf(kv, len, "progress=%llu", (unsigned long long)idle_loops);
}

static void session(void)
{
	tree_member_signals();
	if (setsid() < 0)
		die("session: setsid");
	my_ids = ids_now();
	tree_say_to_root("UP session %d", (int)getpid());
	for (;;) {
		tree_member_service("session", session_check);
		if (term_requested)
			_exit(0);
		idle_loops++;
		sleep_ms(5);
	}
}

/* ---- the child: pipe 1 -> pipe 2 -------------------------------------- */

static int p1r, p2w;
static struct stream s1 = {.name = "pipe 1 (grandchild -> child)"};

static void child_check(int seq, struct verdict *v, char *kv, size_t len)
{
	check_ids(v, "child", my_ids);
	check_flags(v, "pipe 1 read end", p1r, O_RDONLY);
	check_flags(v, "pipe 2 write end", p2w, O_WRONLY);
	check_flags(v, "shared.dat", sfd, O_RDWR | O_NONBLOCK);
	shared_write(v, "child", 'C', seq, (off_t)(seq - 1) * 16 + 8);
	check_clocks(v, &clk, "child");
	kvf(kv, len, "progress=%llu", (unsigned long long)s1.next);
}

/*
 * ready waits up to 100 ms for fd to be ready for events. A check request
 * that arrives just before a blocking call would not interrupt it: the
 * child would sleep in write() on a full pipe 2 while the root, waiting
 * for its report, does not drain it. The timeout bounds that window.
 */
static int ready(int fd, short events)
{
	struct pollfd pf = {.fd = fd, .events = events};
	return poll(&pf, 1, 100) > 0;
}

/* forward writes to the blocking pipe 2, answering checks when interrupted. */
static void forward(const uint8_t *p, size_t n)
{
	while (n > 0) {
		if (!ready(p2w, POLLOUT)) {
			tree_member_service("child", child_check);
			if (term_requested)
				return;
			continue;
		}
		ssize_t w = write(p2w, p, n);
		if (w < 0) {
			if (errno != EINTR) {
				latch("pipe 2: write: %s", strerror(errno));
				sleep_ms(10);
			}
		} else {
			p += w;
			n -= (size_t)w;
		}
		tree_member_service("child", child_check);
		if (term_requested)
			return;
	}
}

static void child(int p1[2])
{
	tree_member_signals();
	if (setpgid(0, 0))
		die("child: setpgid(0, 0)");
	my_ids = ids_now();
	int fl = fcntl(sfd, F_GETFL);
	if (fcntl(sfd, F_SETFL, fl | O_NONBLOCK))
		die("child: F_SETFL shared.dat");
	grandchild_pid = fork();
	if (grandchild_pid < 0)
		die("fork grandchild");
	if (grandchild_pid == 0) {
		close(p1[0]);
		close(p2w);
		close(sfd);
		p1w = p1[1];
		child_pid = (pid_t)syscall(SYS_getppid);
		grandchild();
	}
	session_pid = fork();
	if (session_pid < 0)
		die("fork session");
	if (session_pid == 0) {
		close(p1[0]);
		close(p1[1]);
		close(p2w);
		close(sfd);
		session();
	}
	close(p1[1]);
	p1r = p1[0];
	tree_say_to_root("UP child %d", (int)getpid());
	uint8_t buf[4096];
	for (;;) {
		tree_member_service("child", child_check);
		if (term_requested) {
			pid_t kids[2] = {grandchild_pid, session_pid};
			end_children(kids, 2);
			_exit(0);
		}
		if (!ready(p1r, POLLIN))
			continue;
		ssize_t n = read(p1r, buf, sizeof(buf));
		if (n < 0) {
			if (errno != EINTR) {
				latch("pipe 1: read: %s", strerror(errno));
				sleep_ms(10);
			}
			continue;
		}
		if (n == 0) {
			latch("pipe 1: end of file (the grandchild is gone)");
			sleep_ms(10);
			continue;
		}
		stream_feed(&s1, buf, (size_t)n);
		forward(buf, (size_t)n);
	}
}

/* ---- the root --------------------------------------------------------- */

static int p2r;
static int single_w; /* --single: the write end of the root's own pipe */
static uint64_t single_next;
static struct stream s2 = {.name = "pipe 2 (child -> root)"};

static void check_zombie(struct verdict *v, const char *name, pid_t pid, int code, int status)
{
	siginfo_t si;
	memset(&si, 0, sizeof(si));
	if (waitid(P_PID, (id_t)pid, &si, WEXITED | WNOHANG | WNOWAIT)) {
		vfail(v, "%s %d: waitid: %s", name, (int)pid, strerror(errno));
		return;
	}
	if (si.si_pid != pid) {
		vfail(v, "%s %d: not a zombie (waitid WNOHANG found nothing)", name, (int)pid);
		return;
	}
	if (si.si_code != code || si.si_status != status)
		vfail(v, "%s %d: si_code %d si_status %d, want %d %d", name, (int)pid, si.si_code, si.si_status, code,
		      status);
	char state = proc_state(pid);
	if (state != 'Z')
		vfail(v, "%s %d: state %c in /proc, want Z", name, (int)pid, state ? state : '?');
}

static void root_check(int seq)
{
	struct verdict v = {0};
	char kv[4096] = "";
	if (latched_set)
		vfail(&v, "%s", latched);
	check_ids(&v, "root", my_ids);
	check_clocks(&v, &clk, "root");
	check_flags(&v, "pipe 2 read end", p2r, O_RDONLY | O_NONBLOCK);
	if (single) {
		check_flags(&v, "pipe write end", single_w, O_WRONLY | O_NONBLOCK);
		check_flags(&v, "shared.dat", sfd, O_RDWR);
		shared_write(&v, "root", 'P', seq, (off_t)(seq - 1) * 16);
		shared_write(&v, "root (for the child)", 'C', seq, (off_t)(seq - 1) * 16 + 8);
	} else {
		check_flags(&v, "shared.dat", sfd, O_RDWR | O_NONBLOCK);
		shared_write(&v, "root", 'P', seq, (off_t)(seq - 1) * 16);
		if (!no_zombies) {
			check_zombie(&v, "zombie-exit", zexit, CLD_EXITED, 42);
			check_zombie(&v, "zombie-signal", zsig, CLD_KILLED, SIGUSR2);
		}
		tree_collect(seq, &v, kv, sizeof(kv));
		off_t off = lseek(sfd, 0, SEEK_CUR);
		if (off != (off_t)seq * 16)
			vfail(&v, "root: shared.dat offset %lld after the child's write, want %lld", (long long)off,
			      (long long)seq * 16);
	}
	shared_contents(&v, seq);
	if (v.failed)
		say("CHECK %d FAIL %s", seq, v.why);
	else
		say("CHECK %d OK progress=%llu %s", seq, (unsigned long long)s2.next, kv);
}

static void root_exit(struct opts *o)
{
	int zx = -1, zs = -1, ended = 0;
	if (!single) {
		pid_t kids[1] = {child_pid};
		ended = end_children(kids, 1);
		int st;
		if (zexit > 0 && waitpid(zexit, &st, WNOHANG) == zexit && WIFEXITED(st))
			zx = WEXITSTATUS(st);
		if (zsig > 0 && waitpid(zsig, &st, WNOHANG) == zsig && WIFSIGNALED(st))
			zs = WTERMSIG(st);
	}
	say("EXIT %d progress=%llu zombie_exit=%d zombie_signal=%d children_ended=%d", o->exit_code,
	    (unsigned long long)s2.next, zx, zs, ended);
	exit(o->exit_code);
}

int main(int argc, char **argv)
{
	struct opts o;
	/* --single and --no-zombies are ours; the rest is fixture.h's. */
	while (argc > 1 && (strcmp(argv[1], "--single") == 0 || strcmp(argv[1], "--no-zombies") == 0)) {
		if (strcmp(argv[1], "--single") == 0)
			single = 1;
		else
			no_zombies = 1;
		argv[1] = argv[0];
		argc--;
		argv++;
	}
	parse_opts(argc, argv, &o);
	tree_root_signals();
	my_ids = ids_now();
	sfd = open("shared.dat", O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (sfd < 0)
		die("open shared.dat");
	tree_add("root", getpid(), 0);
	int p2[2];
	if (pipe2(p2, O_CLOEXEC))
		die("pipe2");
	p2r = p2[0];
	fcntl(p2r, F_SETFL, O_NONBLOCK);
	if (single) {
		single_w = p2[1];
		fcntl(single_w, F_SETFL, O_NONBLOCK);
	} else {
		tree_report_pipe();
		if (!no_zombies) {
			zexit = fork();
			if (zexit == 0)
				_exit(42);
			zsig = fork();
			if (zsig == 0) {
				signal(SIGUSR2, SIG_DFL);
				raise(SIGUSR2);
				_exit(1);
			}
			if (zexit < 0 || zsig < 0)
				die("fork zombies");
			tree_add("zombie-exit", zexit, 0);
			tree_add("zombie-signal", zsig, 0);
		}
		int p1[2];
		if (pipe2(p1, O_CLOEXEC))
			die("pipe2");
		child_pid = fork();
		if (child_pid < 0)
			die("fork child");
		if (child_pid == 0) {
			close(rep_rd);
			close(p2r);
			p2w = p2[1];
			child(p1);
		}
		close(p1[0]);
		close(p1[1]);
		close(p2[1]);
		close(rep_wr);
		tree_add("child", child_pid, 1);
		/* Wait until every member is set up. */
		double deadline = mono_now() + 10;
		for (int up = 0; up < 3;) {
			char line[PIPE_BUF + 1], role[32];
			int pid;
			if (tree_read_line(line, sizeof(line), deadline))
				die("the tree did not come up (%d of 3 members)", up);
			if (sscanf(line, "UP %31s %d", role, &pid) != 2)
				continue;
			up++;
			if (strcmp(role, "child") != 0)
				tree_add(role, pid, 1);
		}
		if (!no_zombies) {
			wait_zombie(zexit);
			wait_zombie(zsig);
		}
	}
	struct verdict v0 = {0};
	check_clocks(&v0, &clk, "root");
	tree_say_procs();
	say("READY %d", (int)getpid());

	int handled = 0, seq = 0;
	uint8_t buf[2048];
	for (;;) {
		if (term_requested)
			root_exit(&o);
		if (usr1_count != handled) {
			handled = usr1_count;
			root_check(++seq);
		}
		if (single) {
			/* Write more than is read: the pipe stays full. */
			uint8_t batch[BATCH * REC];
			for (int i = 0; i < BATCH; i++)
				make_record(batch + i * REC, single_next + (uint64_t)i);
			if (write(single_w, batch, sizeof(batch)) == (ssize_t)sizeof(batch))
				single_next += BATCH;
		}
		struct pollfd pfd = {.fd = p2r, .events = POLLIN};
		if (poll(&pfd, 1, 5) <= 0)
			continue;
		ssize_t n = read(p2r, buf, sizeof(buf));
		if (n > 0)
			stream_feed(&s2, buf, (size_t)n);
		else if (n == 0) {
			latch("pipe 2: end of file (the child is gone)");
			sleep_ms(10);
		} else if (errno != EAGAIN && errno != EINTR)
			latch("pipe 2: read: %s", strerror(errno));
		sleep_ms(3);
	}
}
