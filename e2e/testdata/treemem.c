/*
 * treemem.c - a process tree for the tree dump/restore benchmark: the
 * main process forks --procs N - 1 children (default 16 in all); each of
 * the N processes populates --mib M MiB (default 64) of anonymous memory
 * with its own pattern. On SIGUSR1 the main process checks its memory and
 * asks every child, through its own pipe, to check its memory; each child
 * answers through a shared result pipe. The line says how many processes
 * answered and that every one of them still has its PID and parent.
 *
 * Build: gcc -O2 -Wall treemem.c -o treemem
 * Protocol: see fixture.h.
 */
#include "fixture.h"

#include <sys/mman.h>
#include <sys/wait.h>

#define MIB (1ul << 20)
#define MAXPROCS 64

static uint8_t *fill_mem(long mib, int idx)
{
	uint8_t *m = mmap(NULL, (size_t)mib * MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (m == MAP_FAILED)
		return NULL;
	fill_pattern(m, (size_t)mib * MIB, seed3(0x7ee, (uint64_t)idx, 0));
	return m;
}

/* child serves check requests (one byte each) until its request pipe closes. */
static void child(int idx, long mib, int req, int res, pid_t parent)
{
	uint8_t *m = fill_mem(mib, idx);
	struct { int idx; pid_t pid; int ok; } a = {idx, getpid(), m != NULL};
	write_all(res, (const char *)&a, sizeof(a)); /* filled */
	for (;;) {
		char c;
		ssize_t n = read(req, &c, 1);
		if (n == 0)
			_exit(0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			_exit(3);
		}
		a.ok = m != NULL && check_pattern(m, (size_t)mib * MIB, seed3(0x7ee, (uint64_t)idx, 0)) < 0 &&
		       getppid() == parent;
		write_all(res, (const char *)&a, sizeof(a));
	}
}

int main(int argc, char **argv)
{
	int procs = 16;
	long mib = 64;
	for (int i = 1; i + 1 < argc; i += 2) {
		if (strcmp(argv[i], "--procs") == 0)
			procs = atoi(argv[i + 1]);
		else if (strcmp(argv[i], "--mib") == 0)
			mib = atol(argv[i + 1]);
	}
	if (procs < 1 || procs > MAXPROCS || mib < 1)
		die("bad --procs %d or --mib %ld", procs, mib);
	signal(SIGUSR1, on_usr1);
	signal(SIGTERM, on_term);
	sigset_t block, waitmask;
	sigemptyset(&block);
	sigaddset(&block, SIGUSR1);
	sigaddset(&block, SIGTERM);
	sigprocmask(SIG_BLOCK, &block, &waitmask);
	int res[2];
	if (pipe(res) < 0)
		die("pipe");
	int req[MAXPROCS];
	pid_t kids[MAXPROCS];
	for (int i = 1; i < procs; i++) {
		int p[2];
		if (pipe(p) < 0)
			die("pipe");
		pid_t k = fork();
		if (k < 0)
			die("fork");
		if (k == 0) {
			signal(SIGUSR1, SIG_IGN);
			signal(SIGTERM, SIG_DFL);
			sigprocmask(SIG_SETMASK, &waitmask, NULL);
			close(p[1]);
			close(res[0]);
			for (int j = 1; j < i; j++)
				close(req[j]);
			child(i, mib, p[0], res[1], getppid());
		}
		close(p[0]);
		req[i] = p[1];
		kids[i] = k;
	}
	close(res[1]);
	uint8_t *m = fill_mem(mib, 0);
	if (m == NULL)
		die("allocate %ld MiB", mib);
	for (int i = 1; i < procs; i++) {
		struct { int idx; pid_t pid; int ok; } a;
		if (read(res[0], &a, sizeof(a)) != sizeof(a) || !a.ok)
			die("child %d did not fill its memory", i);
	}
	say("READY %d", getpid());
	int seq = 0;
	for (;;) {
		if (term_requested) {
			for (int i = 1; i < procs; i++) {
				close(req[i]);
				waitpid(kids[i], NULL, 0);
			}
			say("EXIT %d", 7);
			exit(7);
		}
		if (usr1_count > seq) {
			seq++;
			int good = check_pattern(m, (size_t)mib * MIB, seed3(0x7ee, 0, 0)) < 0;
			int answered = 1, bad = -1;
			for (int i = 1; i < procs; i++)
				write_all(req[i], "c", 1);
			for (int i = 1; i < procs; i++) {
				struct { int idx; pid_t pid; int ok; } a;
				if (read(res[0], &a, sizeof(a)) != sizeof(a))
					break;
				answered++;
				if (!a.ok || a.idx < 1 || a.idx >= procs || a.pid != kids[a.idx])
					bad = a.idx;
			}
			if (good && answered == procs && bad < 0)
				say("CHECK %d OK procs=%d mib=%ld", seq, procs, mib);
			else
				say("CHECK %d FAIL main=%d answered=%d/%d bad_child=%d", seq, good, answered, procs, bad);
		}
		sigsuspend(&waitmask);
	}
}
