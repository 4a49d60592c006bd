/*
 * fdtable.c - a descriptor table with gaps and shared descriptions: files
 * placed at numbers out of order (12, 4, 9, 3), a second descriptor of
 * one open file (5, sharing its offset), a pipe in between (6 and 7),
 * close-on-exec set on some only, and numbers left free (8, 10, 11). The
 * self-check verifies every descriptor: what it is, its offset and flags,
 * that 4 and 5 share an offset, that the pipe carries data, and that the
 * free numbers are still free.
 *
 * Build: gcc -O2 -Wall fdtable.c -o fdtable
 * Protocol: see fixture.h.
 */
#include "fixture.h"

static uint64_t progress, last_progress;

/* place opens path and moves it to descriptor want. */
static void place(const char *path, int flags, int want, int cloexec)
{
	int fd = open(path, flags | O_CLOEXEC, 0644);
	if (fd < 0)
		die("open %s", path);
	if (fd == want) {
		if (!cloexec && fcntl(fd, F_SETFD, 0) != 0)
			die("fcntl %d", want);
		return;
	}
	if (dup3(fd, want, cloexec ? O_CLOEXEC : 0) != want)
		die("dup3 %d", want);
	close(fd);
}

static void expect_fd(struct verdict *v, int fd, mode_t type, int cloexec, off_t pos)
{
	struct stat st;
	if (fstat(fd, &st) != 0) {
		vfail(v, "descriptor %d: %s", fd, strerror(errno));
		return;
	}
	if ((st.st_mode & S_IFMT) != type)
		vfail(v, "descriptor %d: type %o, want %o", fd, st.st_mode & S_IFMT, type);
	int fdflags = fcntl(fd, F_GETFD);
	if (!!(fdflags & FD_CLOEXEC) != cloexec)
		vfail(v, "descriptor %d: close-on-exec %d, want %d", fd, !!(fdflags & FD_CLOEXEC), cloexec);
	if (pos >= 0 && lseek(fd, 0, SEEK_CUR) != pos)
		vfail(v, "descriptor %d: offset %ld, want %ld", fd, (long)lseek(fd, 0, SEEK_CUR), (long)pos);
}

int main(int argc, char **argv)
{
	struct opts opt;
	parse_opts(argc, argv, &opt);
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);
	sa.sa_handler = on_term;
	sigaction(SIGTERM, &sa, NULL);

	/* Out of the way of what is placed: close everything from 3 up. */
	for (int fd = 3; fd < 64; fd++)
		close(fd);
	int p[2]; /* 3 and 4, moved to 6 and 7 */
	if (pipe2(p, O_CLOEXEC) != 0 || p[0] != 3 || p[1] != 4)
		die("pipe");
	if (dup3(p[0], 6, 0) != 6 || dup3(p[1], 7, O_CLOEXEC) != 7)
		die("dup3 pipe");
	close(p[0]);
	close(p[1]);
	place(".", O_RDONLY | O_DIRECTORY, 12, 0);
	place("fdtable.dat", O_RDWR | O_CREAT | O_TRUNC, 4, 1);
	if (write(4, "0123456789abcdef", 16) != 16 || lseek(4, 5, SEEK_SET) != 5)
		die("write fdtable.dat");
	if (dup3(4, 5, 0) != 5)
		die("dup3 5");
	place("/dev/null", O_WRONLY, 9, 1);
	place("fdtable.log", O_WRONLY | O_CREAT | O_APPEND, 3, 0);
	if (write(3, "log\n", 4) != 4)
		die("write fdtable.log");
	say("READY %d", (int)getpid());

	int handled = 0, seq = 0;
	for (;;) {
		if (term_requested) {
			say("EXIT %d progress=%llu", opt.exit_code, (unsigned long long)progress);
			exit(opt.exit_code);
		}
		if (usr1_count != handled) {
			handled = usr1_count;
			seq++;
			struct verdict v = {0};
			if (seq > 1 && progress <= last_progress)
				vfail(&v, "progress did not advance");
			last_progress = progress;
			expect_fd(&v, 3, S_IFREG, 0, -1);
			expect_fd(&v, 4, S_IFREG, 1, 5);
			expect_fd(&v, 5, S_IFREG, 0, 5);
			expect_fd(&v, 6, S_IFIFO, 0, -1);
			expect_fd(&v, 7, S_IFIFO, 1, -1);
			expect_fd(&v, 9, S_IFCHR, 1, -1);
			expect_fd(&v, 12, S_IFDIR, 0, -1);
			if ((fcntl(3, F_GETFL) & O_APPEND) == 0)
				vfail(&v, "descriptor 3 lost O_APPEND");
			/* 4 and 5 are one open file: moving one moves the other. */
			char c = 0;
			if (pread(4, &c, 1, 5) != 1 || c != '5')
				vfail(&v, "descriptor 4 reads %c at offset 5", c);
			if (lseek(5, 7, SEEK_SET) != 7 || lseek(4, 0, SEEK_CUR) != 7)
				vfail(&v, "descriptors 4 and 5 do not share their offset");
			lseek(4, 5, SEEK_SET);
			if (write(7, "x", 1) != 1 || read(6, &c, 1) != 1 || c != 'x')
				vfail(&v, "the pipe 7 -> 6 does not carry data");
			for (int fd = 8; fd <= 11; fd++)
				if (fd != 9 && fcntl(fd, F_GETFD) != -1)
					vfail(&v, "descriptor %d is open, it was free", fd);
			if (fcntl(13, F_GETFD) != -1)
				vfail(&v, "descriptor 13 is open, it was free");
			if (v.failed)
				say("CHECK %d FAIL %s", seq, v.why);
			else
				say("CHECK %d OK progress=%llu", seq, (unsigned long long)progress);
		}
		progress++;
		sleep_ms(1);
	}
}
