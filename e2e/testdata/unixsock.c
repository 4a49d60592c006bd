/*
 * unixsock.c - a workload holding unix domain sockets and a FIFO with data
 * queued in each, to check that a dump and restore keeps every queued byte
 * and message exactly once, in order and with its boundaries, and that the
 * sockets still work.
 *
 *   stream    socketpair(SOCK_STREAM), bytes queued both ways; end 0 is
 *             O_NONBLOCK, end 1 has SO_SNDBUF set.
 *   dgram     socketpair(SOCK_DGRAM), datagrams of 1, 0, 300, 4000 and
 *             70000 bytes queued in end 0, one in end 1.
 *   seqpacket socketpair(SOCK_SEQPACKET), records queued in end 0, which
 *             has SO_PASSCRED: each must carry our own credentials.
 *   closing   socketpair(SOCK_STREAM): end 1 wrote "bye" and shut down
 *             writing: end 0 reads "bye", then end of file.
 *   listener  SOCK_STREAM bound to --dir/listen.sock (O_NONBLOCK), a client
 *             connected to it and the accepted end, bytes queued both ways,
 *             and a second client whose connection is not accepted yet: it
 *             must be the next one accepted; a new client must connect
 *             after restore.
 *   abstract  SOCK_DGRAM bound to an abstract name, and an unnamed one
 *             connected to it with datagrams queued; they must arrive from
 *             an unnamed sender.
 *   fifo      mkfifo --dir/fifo, open for reading (O_NONBLOCK) and writing,
 *             bytes queued.
 *
 * Check 1 looks at the queues without reading them (FIONREAD and MSG_PEEK)
 * and reports the descriptor numbers; check 2 (the first after restore)
 * reads everything queued and sends new data every way; later checks only
 * report progress.
 *
 * --rights 1 also queues a descriptor (SCM_RIGHTS) in a socketpair
 * (rights_fd=); --ext-stream PATH connects a stream socket to a listener
 * outside (ext_stream_fd=), --ext-dgram PATH a datagram socket to a bound
 * socket outside (ext_dgram_fd=): check 2 sends "ext <pid>" on each.
 *
 * Build: gcc -O2 -Wall unixsock.c -o unixsock
 * Protocol: see fixture.h.
 */
#include "fixture.h"

#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>

static const char *dir;
static int want_rights;
static const char *ext_stream, *ext_dgram;
static int exit_code = 7;

static int st[2], dg[2], sp[2], cl[2], lsn = -1, cli = -1, acc = -1, pnd = -1, asrv = -1, acli = -1, ffr = -1, ffw = -1;
static int rt[2] = {-1, -1}, exs = -1, exd = -1;
static int flags_at_setup[1024];
static int sndbuf_st1;
static char lpath[sizeof(((struct sockaddr_un *)0)->sun_path)], fpath[512];
static struct sockaddr_un aaddr;
static socklen_t aaddr_len;
static uint64_t progress;

/* What is queued, byte for byte. */
static char st_a2b[3000], st_b2a[777], acc_in[1234], cli_in[99], fifo_data[5000];
static const size_t dg_sizes[] = {1, 0, 300, 4000, 70000};
#define NDG (sizeof(dg_sizes) / sizeof(dg_sizes[0]))
static const char *sp_recs[] = {"first record", "", "third, a longer record"};
#define NSP 3
#define NAB 4 /* datagrams queued in the abstract socket */

static void fill(char *p, size_t n, unsigned seed)
{
	for (size_t i = 0; i < n; i++)
		p[i] = (char)('a' + (i * 7 + seed) % 26);
}

static void send_all(int fd, const void *p, size_t n, const char *what)
{
	const char *c = p;
	while (n > 0) {
		ssize_t w = send(fd, c, n, MSG_NOSIGNAL);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			die("send %s", what);
		}
		c += w;
		n -= (size_t)w;
	}
}

static void dgram_of(char *buf, size_t n, unsigned i)
{
	fill(buf, n, 100 + i);
	if (n >= 4)
		memcpy(buf, &i, sizeof(i));
}

static void parse_args(int argc, char **argv)
{
	for (int i = 1; i + 1 < argc; i += 2) {
		const char *a = argv[i], *v = argv[i + 1];
		if (strcmp(a, "--dir") == 0)
			dir = v;
		else if (strcmp(a, "--rights") == 0)
			want_rights = atoi(v);
		else if (strcmp(a, "--ext-stream") == 0)
			ext_stream = v;
		else if (strcmp(a, "--ext-dgram") == 0)
			ext_dgram = v;
		else if (strcmp(a, "--exit-code") == 0)
			exit_code = atoi(v);
		else {
			say("SETUP FAIL unknown option %s", a);
			exit(2);
		}
	}
	if (argc % 2 == 0 || !dir) {
		say("SETUP FAIL usage: unixsock --dir DIR [--rights 1] [--ext-stream PATH] [--ext-dgram PATH]");
		exit(2);
	}
}

static int connect_path(int type, const char *path)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	snprintf(a.sun_path, sizeof(a.sun_path), "%s", path);
	int fd = socket(AF_UNIX, type | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0)
		return -1;
	return fd;
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
	signal(SIGPIPE, SIG_IGN);

	fill(st_a2b, sizeof(st_a2b), 1);
	fill(st_b2a, sizeof(st_b2a), 2);
	fill(acc_in, sizeof(acc_in), 3);
	fill(cli_in, sizeof(cli_in), 4);
	fill(fifo_data, sizeof(fifo_data), 5);

	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, st))
		die("socketpair stream");
	fcntl(st[1], F_SETFL, 0); /* only end 0 non-blocking */
	sndbuf_st1 = 50000;
	if (setsockopt(st[1], SOL_SOCKET, SO_SNDBUF, &sndbuf_st1, sizeof(sndbuf_st1)))
		die("SO_SNDBUF");
	socklen_t l = sizeof(sndbuf_st1);
	getsockopt(st[1], SOL_SOCKET, SO_SNDBUF, &sndbuf_st1, &l);
	send_all(st[0], st_a2b, sizeof(st_a2b), "stream a->b");
	send_all(st[1], st_b2a, sizeof(st_b2a), "stream b->a");

	if (socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, dg))
		die("socketpair dgram");
	int big = 1 << 20;
	setsockopt(dg[1], SOL_SOCKET, SO_SNDBUF, &big, sizeof(big));
	static char buf[70000];
	for (unsigned i = 0; i < NDG; i++) {
		dgram_of(buf, dg_sizes[i], i);
		if (send(dg[1], buf, dg_sizes[i], 0) != (ssize_t)dg_sizes[i])
			die("send datagram %u", i);
	}
	if (send(dg[0], "reply", 5, 0) != 5)
		die("send datagram back");

	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sp))
		die("socketpair seqpacket");
	int one = 1;
	if (setsockopt(sp[0], SOL_SOCKET, SO_PASSCRED, &one, sizeof(one)))
		die("SO_PASSCRED");
	for (int i = 0; i < NSP; i++)
		if (send(sp[1], sp_recs[i], strlen(sp_recs[i]), 0) != (ssize_t)strlen(sp_recs[i]))
			die("send record %d", i);

	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, cl))
		die("socketpair closing");
	send_all(cl[1], "bye", 3, "bye");
	if (shutdown(cl[1], SHUT_WR))
		die("shutdown");

	snprintf(lpath, sizeof(lpath), "%s/listen.sock", dir);
	struct sockaddr_un la = {.sun_family = AF_UNIX};
	snprintf(la.sun_path, sizeof(la.sun_path), "%s", lpath);
	if ((lsn = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)) < 0 ||
	    bind(lsn, (struct sockaddr *)&la, sizeof(la)) || listen(lsn, 16))
		die("listener %s", lpath);
	if ((cli = connect_path(SOCK_STREAM, lpath)) < 0)
		die("connect %s", lpath);
	if ((acc = accept4(lsn, NULL, NULL, SOCK_CLOEXEC)) < 0)
		die("accept");
	if ((pnd = connect_path(SOCK_STREAM, lpath)) < 0)
		die("connect a pending client to %s", lpath);
	send_all(cli, acc_in, sizeof(acc_in), "client->accepted");
	send_all(acc, cli_in, sizeof(cli_in), "accepted->client");

	aaddr.sun_family = AF_UNIX;
	int n = snprintf(aaddr.sun_path + 1, sizeof(aaddr.sun_path) - 1, "phaul-unixsock-%d", (int)getpid());
	aaddr_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + n);
	if ((asrv = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0)) < 0 ||
	    bind(asrv, (struct sockaddr *)&aaddr, aaddr_len))
		die("abstract bind");
	if ((acli = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0)) < 0 ||
	    connect(acli, (struct sockaddr *)&aaddr, aaddr_len))
		die("abstract connect");
	for (unsigned i = 0; i < NAB; i++) {
		dgram_of(buf, 10 + 50 * i, 200 + i);
		if (send(acli, buf, 10 + 50 * i, 0) < 0)
			die("abstract send %u", i);
	}

	snprintf(fpath, sizeof(fpath), "%s/fifo", dir);
	if (mkfifo(fpath, 0600) && errno != EEXIST)
		die("mkfifo %.500s", fpath);
	if ((ffr = open(fpath, O_RDONLY | O_NONBLOCK | O_CLOEXEC)) < 0 || (ffw = open(fpath, O_WRONLY | O_CLOEXEC)) < 0)
		die("open fifo");
	if (write(ffw, fifo_data, sizeof(fifo_data)) != (ssize_t)sizeof(fifo_data))
		die("write fifo");

	if (want_rights) {
		if (socketpair(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, rt))
			die("socketpair rights");
		char cbuf[CMSG_SPACE(sizeof(int))];
		memset(cbuf, 0, sizeof(cbuf));
		struct iovec iov = {.iov_base = "fd", .iov_len = 2};
		struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf)};
		struct cmsghdr *c = CMSG_FIRSTHDR(&m);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &ffw, sizeof(int));
		if (sendmsg(rt[1], &m, 0) != 2)
			die("sendmsg SCM_RIGHTS");
	}
	if (ext_stream && (exs = connect_path(SOCK_STREAM, ext_stream)) < 0)
		die("connect %s", ext_stream);
	if (ext_dgram && (exd = connect_path(SOCK_DGRAM, ext_dgram)) < 0)
		die("connect %s", ext_dgram);

	for (int fd = 0; fd < 1024; fd++)
		flags_at_setup[fd] = fcntl(fd, F_GETFL);
}

static int inq(int fd)
{
	int n = -1;
	ioctl(fd, FIONREAD, &n);
	return n;
}

/* check_peek verifies the queues without reading them. */
static void check_peek(struct verdict *v)
{
	if (inq(st[0]) != (int)sizeof(st_b2a) || inq(st[1]) != (int)sizeof(st_a2b))
		vfail(v, "stream queues %d and %d bytes", inq(st[0]), inq(st[1]));
	if (inq(dg[0]) != (int)dg_sizes[0])
		vfail(v, "first datagram of %d bytes", inq(dg[0]));
	if (inq(acc) != (int)sizeof(acc_in) || inq(cli) != (int)sizeof(cli_in))
		vfail(v, "connection queues %d and %d", inq(acc), inq(cli));
	if (inq(ffr) != (int)sizeof(fifo_data))
		vfail(v, "fifo holds %d bytes", inq(ffr));
}

/* read_exact reads n bytes from fd (waiting up to a second) and compares. */
static void read_exact(struct verdict *v, int fd, const char *want, size_t n, const char *what)
{
	static char buf[1 << 17];
	size_t got = 0;
	while (got < n) {
		struct pollfd p = {.fd = fd, .events = POLLIN};
		if (poll(&p, 1, 1000) <= 0) {
			vfail(v, "%s: %zu of %zu bytes, then nothing", what, got, n);
			return;
		}
		ssize_t r = recv(fd, buf + got, n - got > sizeof(buf) - got ? sizeof(buf) - got : n - got, MSG_DONTWAIT);
		if (r <= 0 && !(r < 0 && (errno == EAGAIN || errno == EINTR))) {
			vfail(v, "%s: %zu of %zu bytes, then %s", what, got, n, r == 0 ? "end of file" : strerror(errno));
			return;
		}
		if (r > 0)
			got += (size_t)r;
	}
	if (memcmp(buf, want, n) != 0)
		vfail(v, "%s: the bytes differ", what);
}

/* nothing_more requires fd to have no more data queued. */
static void nothing_more(struct verdict *v, int fd, const char *what)
{
	char c;
	ssize_t r = recv(fd, &c, 1, MSG_DONTWAIT);
	if (r >= 0 || errno != EAGAIN)
		vfail(v, "%s: more than was queued (%zd, %s)", what, r, r < 0 ? strerror(errno) : "data");
}

static void read_fifo(struct verdict *v)
{
	static char buf[sizeof(fifo_data) + 1];
	ssize_t r = read(ffr, buf, sizeof(buf));
	if (r != (ssize_t)sizeof(fifo_data) || memcmp(buf, fifo_data, sizeof(fifo_data)) != 0)
		vfail(v, "fifo: read %zd bytes, want %zu", r, sizeof(fifo_data));
	r = read(ffr, buf, 1);
	if (r >= 0 || errno != EAGAIN)
		vfail(v, "fifo: more than was queued (%zd)", r);
}

/* round_trip sends msg on a and wants it, whole, on b. */
static void round_trip(struct verdict *v, int a, int b, const char *what)
{
	char msg[64], got[64];
	int n = snprintf(msg, sizeof(msg), "new %s %d", what, (int)getpid());
	if (send(a, msg, (size_t)n, MSG_NOSIGNAL) != n) {
		vfail(v, "%s: send: %s", what, strerror(errno));
		return;
	}
	struct pollfd p = {.fd = b, .events = POLLIN};
	poll(&p, 1, 1000);
	ssize_t r = recv(b, got, sizeof(got), MSG_DONTWAIT);
	if (r != n || memcmp(got, msg, (size_t)n) != 0)
		vfail(v, "%s: received %zd bytes, want %d", what, r, n);
}

static void check_datagrams(struct verdict *v)
{
	static char buf[80000], want[80000];
	for (unsigned i = 0; i < NDG; i++) {
		ssize_t r = recv(dg[0], buf, sizeof(buf), MSG_DONTWAIT);
		dgram_of(want, dg_sizes[i], i);
		if (r != (ssize_t)dg_sizes[i] || memcmp(buf, want, dg_sizes[i]) != 0) {
			vfail(v, "datagram %u: %zd bytes, want %zu", i, r, dg_sizes[i]);
			return;
		}
	}
	nothing_more(v, dg[0], "dgram end 0");
	ssize_t r = recv(dg[1], buf, sizeof(buf), MSG_DONTWAIT);
	if (r != 5 || memcmp(buf, "reply", 5) != 0)
		vfail(v, "datagram back: %zd bytes", r);
	nothing_more(v, dg[1], "dgram end 1");
}

static void check_records(struct verdict *v)
{
	for (int i = 0; i < NSP; i++) {
		char buf[256], cbuf[CMSG_SPACE(sizeof(struct ucred))];
		struct iovec iov = {.iov_base = buf, .iov_len = sizeof(buf)};
		struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf)};
		ssize_t r = recvmsg(sp[0], &m, MSG_DONTWAIT);
		size_t n = strlen(sp_recs[i]);
		if (r != (ssize_t)n || memcmp(buf, sp_recs[i], n) != 0) {
			vfail(v, "record %d: %zd bytes, want %zu", i, r, n);
			return;
		}
		struct cmsghdr *c = CMSG_FIRSTHDR(&m);
		struct ucred uc;
		if (!c || c->cmsg_type != SCM_CREDENTIALS) {
			vfail(v, "record %d came without credentials", i);
			continue;
		}
		memcpy(&uc, CMSG_DATA(c), sizeof(uc));
		if (uc.pid != getpid() || uc.uid != getuid() || uc.gid != getgid())
			vfail(v, "record %d: credentials pid %d uid %d gid %d, want %d %d %d", i, (int)uc.pid,
			      (int)uc.uid, (int)uc.gid, (int)getpid(), (int)getuid(), (int)getgid());
	}
	nothing_more(v, sp[0], "seqpacket end 0");
}

static void check_abstract(struct verdict *v)
{
	static char buf[512], want[512];
	for (unsigned i = 0; i < NAB; i++) {
		struct sockaddr_un from;
		socklen_t fl = sizeof(from);
		ssize_t r = recvfrom(asrv, buf, sizeof(buf), MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
		size_t n = 10 + 50 * i;
		dgram_of(want, n, 200 + i);
		if (r != (ssize_t)n || memcmp(buf, want, n) != 0) {
			vfail(v, "abstract datagram %u: %zd bytes, want %zu", i, r, n);
			return;
		}
		if (fl > sizeof(sa_family_t))
			vfail(v, "abstract datagram %u: from a named sender (address length %u)", i, (unsigned)fl);
	}
	nothing_more(v, asrv, "abstract socket");
	struct sockaddr_un me;
	socklen_t ml = sizeof(me);
	if (getsockname(asrv, (struct sockaddr *)&me, &ml) || ml != aaddr_len || memcmp(&me, &aaddr, ml) != 0)
		vfail(v, "abstract socket lost its name");
	round_trip(v, acli, asrv, "abstract");
}

static void check_listener(struct verdict *v)
{
	read_exact(v, acc, acc_in, sizeof(acc_in), "accepted end");
	read_exact(v, cli, cli_in, sizeof(cli_in), "client end");
	nothing_more(v, acc, "accepted end");
	nothing_more(v, cli, "client end");
	round_trip(v, cli, acc, "client->accepted");
	round_trip(v, acc, cli, "accepted->client");
	struct sockaddr_un me;
	socklen_t ml = sizeof(me);
	if (getsockname(acc, (struct sockaddr *)&me, &ml) || strcmp(me.sun_path, lpath) != 0)
		vfail(v, "accepted end is named %s, want %s", me.sun_path, lpath);
	ml = sizeof(me);
	if (getsockname(lsn, (struct sockaddr *)&me, &ml) || strcmp(me.sun_path, lpath) != 0)
		vfail(v, "listener is named %s, want %s", me.sun_path, lpath);
	struct pollfd pp = {.fd = lsn, .events = POLLIN};
	poll(&pp, 1, 1000);
	int pa = accept4(lsn, NULL, NULL, SOCK_CLOEXEC);
	if (pa < 0) {
		vfail(v, "accept the pending client: %s", strerror(errno));
	} else {
		round_trip(v, pnd, pa, "pending client");
		round_trip(v, pa, pnd, "pending accepted");
		close(pa);
	}
	int c = connect_path(SOCK_STREAM, lpath);
	if (c < 0) {
		vfail(v, "a new client cannot connect to %s: %s", lpath, strerror(errno));
		return;
	}
	struct pollfd p = {.fd = lsn, .events = POLLIN};
	poll(&p, 1, 1000);
	int a = accept4(lsn, NULL, NULL, SOCK_CLOEXEC);
	if (a < 0) {
		vfail(v, "accept a new client: %s", strerror(errno));
	} else {
		round_trip(v, c, a, "new client");
		round_trip(v, a, c, "new accepted");
		close(a);
	}
	close(c);
}

static void check_flags(struct verdict *v)
{
	for (int fd = 0; fd < 1024; fd++) {
		int now = fcntl(fd, F_GETFL);
		if ((now < 0) != (flags_at_setup[fd] < 0) || (now >= 0 && (now & (O_NONBLOCK | O_ACCMODE)) != (flags_at_setup[fd] & (O_NONBLOCK | O_ACCMODE))))
			vfail(v, "fd %d: flags %#x, want %#x", fd, now, flags_at_setup[fd]);
	}
	int sb = 0, pc = 0;
	socklen_t l = sizeof(sb);
	getsockopt(st[1], SOL_SOCKET, SO_SNDBUF, &sb, &l);
	if (sb != sndbuf_st1)
		vfail(v, "SO_SNDBUF %d, want %d", sb, sndbuf_st1);
	l = sizeof(pc);
	getsockopt(sp[0], SOL_SOCKET, SO_PASSCRED, &pc, &l);
	if (!pc)
		vfail(v, "SO_PASSCRED was lost");
}

static void check_ext(struct verdict *v)
{
	char msg[64];
	int n = snprintf(msg, sizeof(msg), "ext %d", (int)getpid());
	if (exs >= 0 && send(exs, msg, (size_t)n, MSG_NOSIGNAL) != n)
		vfail(v, "external stream: send: %s", strerror(errno));
	if (exd >= 0 && send(exd, msg, (size_t)n, 0) != n)
		vfail(v, "external datagram: send: %s", strerror(errno));
}

static void do_check(int seq)
{
	struct verdict v = {0};
	if (seq == 1) {
		check_peek(&v);
	} else if (seq == 2) {
		read_exact(&v, st[0], st_b2a, sizeof(st_b2a), "stream end 0");
		read_exact(&v, st[1], st_a2b, sizeof(st_a2b), "stream end 1");
		nothing_more(&v, st[0], "stream end 0");
		nothing_more(&v, st[1], "stream end 1");
		round_trip(&v, st[0], st[1], "stream 0->1");
		round_trip(&v, st[1], st[0], "stream 1->0");
		check_datagrams(&v);
		round_trip(&v, dg[0], dg[1], "dgram 0->1");
		round_trip(&v, dg[1], dg[0], "dgram 1->0");
		check_records(&v);
		round_trip(&v, sp[0], sp[1], "seqpacket 0->1");
		round_trip(&v, sp[1], sp[0], "seqpacket 1->0");
		read_exact(&v, cl[0], "bye", 3, "closing end 0");
		char c;
		if (recv(cl[0], &c, 1, MSG_DONTWAIT) != 0)
			vfail(&v, "closing end 0: no end of file after bye");
		round_trip(&v, cl[0], cl[1], "closing 0->1");
		check_listener(&v);
		check_abstract(&v);
		read_fifo(&v);
		if (write(ffw, "more", 4) != 4)
			vfail(&v, "fifo: write: %s", strerror(errno));
		char buf[8];
		if (read(ffr, buf, sizeof(buf)) != 4 || memcmp(buf, "more", 4) != 0)
			vfail(&v, "fifo: new bytes did not come through");
		check_flags(&v);
		check_ext(&v);
	}
	if (v.failed)
		say("CHECK %d FAIL %s", seq, v.why);
	else
		say("CHECK %d OK phase=%s progress=%llu rights_fd=%d ext_stream_fd=%d ext_dgram_fd=%d stream_fd=%d",
		    seq, seq == 1 ? "pre" : seq == 2 ? "post" : "idle", (unsigned long long)progress, rt[0], exs, exd, st[0]);
}

int main(int argc, char **argv)
{
	parse_args(argc, argv);
	setup();
	say("READY %d", (int)getpid());
	int handled = 0, seq = 0;
	for (;;) {
		if (term_requested) {
			say("EXIT %d progress=%llu", exit_code, (unsigned long long)progress);
			exit(exit_code);
		}
		if (usr1_count != handled) {
			handled = usr1_count;
			do_check(++seq);
		}
		sleep_ms(20);
		progress++;
	}
}
