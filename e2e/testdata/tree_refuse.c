/*
 * tree_refuse.c - a tree (root -> child -> grandchild) with one process
 * holding a resource phaul cannot dump, so that a dump of the tree must be
 * refused, name the process and the resource, and leave the whole tree
 * running.
 *
 * Usage: tree_refuse [--where child|grandchild] [--resource io_uring|userfaultfd|none]
 *
 * Each process counts its loops; the root's CHECK line carries everyone's
 * ("child_progress=...", "grandchild_progress=...") and each process checks
 * its PID, parent, process group and session and that its resource is
 * still there. Preamble: "RESOURCE <name> <role> <pid>".
 *
 * Protocol: tree_fixture.h.
 */
#include "tree_fixture.h"

#include <linux/io_uring.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

static const char *where = "child", *resource = "io_uring";
static char role[32] = "root";
static int res_fd = -1;
static const char *res_link;
static uint64_t progress;
static struct ids my_ids;
static struct clockstate clk;

static void setup_resource(void)
{
	if (strcmp(resource, "io_uring") == 0) {
		struct io_uring_params p;
		memset(&p, 0, sizeof(p));
		res_fd = (int)syscall(SYS_io_uring_setup, 8, &p);
		if (res_fd < 0) {
			tree_say_to_root("SKIP io_uring_setup: %s", strerror(errno));
			_exit(0);
		}
		size_t len = p.sq_off.array + p.sq_entries * sizeof(uint32_t);
		if (mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, res_fd, IORING_OFF_SQ_RING) ==
		    MAP_FAILED)
			die("mmap io_uring SQ ring");
		res_link = "io_uring";
	} else if (strcmp(resource, "userfaultfd") == 0) {
		res_fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
		if (res_fd < 0) {
			tree_say_to_root("SKIP userfaultfd: %s", strerror(errno));
			_exit(0);
		}
		struct uffdio_api api = {.api = UFFD_API};
		if (ioctl(res_fd, UFFDIO_API, &api))
			die("UFFDIO_API");
		res_link = "userfaultfd";
	}
	tree_say_to_root("RESOURCE %s %s %d", resource, role, (int)getpid());
}

static void member_check(int seq, struct verdict *v, char *kv, size_t len)
{
	(void)seq;
	check_ids(v, role, my_ids);
	check_clocks(v, &clk, role);
	char buf[PATH_MAX];
	if (res_link && !strstr(fd_target(res_fd, buf, sizeof(buf)), res_link))
		vfail(v, "%s: fd %d points to %s, want %s", role, res_fd, buf, res_link);
	kvf(kv, len, "progress=%llu", (unsigned long long)progress);
}

/* member runs the child (depth 1), which forks the grandchild (depth 2). */
static void member(int depth)
{
	pid_t kid = 0;
	for (;; depth++) {
		snprintf(role, sizeof(role), "%s", depth == 1 ? "child" : "grandchild");
		tree_member_signals();
		my_ids = ids_now();
		if (depth > 1)
			break;
		kid = fork();
		if (kid < 0)
			die("fork grandchild");
		if (kid > 0)
			break;
	}
	/* After the fork: only this process holds the resource. */
	if (strcmp(where, role) == 0)
		setup_resource();
	tree_say_to_root("UP %s %d", role, (int)getpid());
	for (;;) {
		tree_member_service(role, member_check);
		if (term_requested) {
			if (kid > 0)
				end_children(&kid, 1);
			_exit(0);
		}
		progress++;
		sleep_ms(2);
	}
}

int main(int argc, char **argv)
{
	struct opts o;
	while (argc > 2) {
		if (strcmp(argv[1], "--where") == 0)
			where = argv[2];
		else if (strcmp(argv[1], "--resource") == 0)
			resource = argv[2];
		else
			break;
		argv[2] = argv[0];
		argc -= 2;
		argv += 2;
	}
	parse_opts(argc, argv, &o);
	tree_root_signals();
	my_ids = ids_now();
	tree_report_pipe();
	tree_add("root", getpid(), 0);
	pid_t child = fork();
	if (child < 0)
		die("fork child");
	if (child == 0) {
		close(rep_rd);
		member(1);
	}
	close(rep_wr);
	double deadline = mono_now() + 10;
	for (int up = 0; up < 2;) {
		char line[PIPE_BUF + 1], r[32];
		int pid;
		if (tree_read_line(line, sizeof(line), deadline))
			die("the tree did not come up");
		if (strncmp(line, "SKIP ", 5) == 0) {
			say("%s", line);
			end_children(&child, 1);
			return 0;
		}
		if (strncmp(line, "RESOURCE ", 9) == 0)
			say("%s", line);
		if (sscanf(line, "UP %31s %d", r, &pid) == 2) {
			up++;
			tree_add(r, pid, 1);
		}
	}
	struct verdict v0 = {0};
	check_clocks(&v0, &clk, "root");
	tree_say_procs();
	say("READY %d", (int)getpid());
	int handled = 0, seq = 0;
	for (;;) {
		if (term_requested) {
			int ended = end_children(&child, 1);
			say("EXIT %d children_ended=%d", o.exit_code, ended);
			exit(o.exit_code);
		}
		if (usr1_count != handled) {
			handled = usr1_count;
			tree_root_check(++seq, member_check);
		}
		progress++;
		sleep_ms(2);
	}
}
