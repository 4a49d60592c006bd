/*
 * tracer.c - attaches to a process with PTRACE_SEIZE and stays attached,
 * so that the process is "already traced" for phaul. Signals for the
 * tracee are passed on, so the tracee keeps answering its checks.
 *
 * Usage: tracer PID        prints "READY <tracer pid>" once attached.
 * Build: gcc -O2 -Wall tracer.c -o tracer
 */
#include "fixture.h"

#include <sys/ptrace.h>
#include <sys/wait.h>

int main(int argc, char **argv)
{
	if (argc != 2) {
		say("SETUP FAIL usage: tracer PID");
		return 2;
	}
	pid_t pid = (pid_t)atoi(argv[1]);
	if (ptrace(PTRACE_SEIZE, pid, 0, 0))
		die("PTRACE_SEIZE %d", (int)pid);
	say("READY %d", (int)getpid());
	for (;;) {
		int st;
		pid_t w = waitpid(pid, &st, __WALL);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			say("TRACEE GONE %s", strerror(errno));
			return 0;
		}
		if (WIFEXITED(st) || WIFSIGNALED(st)) {
			say("TRACEE EXITED");
			return 0;
		}
		if (!WIFSTOPPED(st))
			continue;
		int sig = WSTOPSIG(st);
		if ((st >> 16) == PTRACE_EVENT_STOP) {
			if (sig == SIGSTOP || sig == SIGTSTP || sig == SIGTTIN || sig == SIGTTOU)
				ptrace(PTRACE_LISTEN, pid, 0, 0); /* group-stop */
			else
				ptrace(PTRACE_CONT, pid, 0, 0);
		} else {
			ptrace(PTRACE_CONT, pid, 0, sig); /* signal-delivery-stop: deliver it */
		}
	}
}
