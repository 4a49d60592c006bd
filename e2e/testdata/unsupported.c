/*
 * unsupported.c - a workload holding a resource phaul cannot checkpoint, so
 * that dump must refuse, name the resource and leave the process running.
 *
 * --resource io_uring (default): an io_uring instance (fd + mapped SQ ring).
 * --resource userfaultfd: a userfaultfd descriptor.
 * The self-check verifies the descriptor, a memory pattern and the clocks.
 *
 * Build: gcc -O2 -Wall unsupported.c -o unsupported
 * Protocol: see fixture.h; prints "RESOURCE <name> fd=<n>" before READY.
 */
#include "fixture.h"

#include <linux/io_uring.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#define STATE_SIZE (64u << 10)

static struct opts opt;
static int res_fd;
static const char *res_link; /* substring expected in /proc/self/fd/N */
static uint8_t *state;
static uint64_t progress, last_progress;
static struct clockstate clk;

static void setup_io_uring(void)
{
	struct io_uring_params p;
	memset(&p, 0, sizeof(p));
	res_fd = (int)syscall(SYS_io_uring_setup, 8, &p);
	if (res_fd < 0) {
		say("SKIP io_uring_setup: %s", strerror(errno));
		exit(0);
	}
	size_t len = p.sq_off.array + p.sq_entries * sizeof(uint32_t);
	void *ring = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, res_fd, IORING_OFF_SQ_RING);
	if (ring == MAP_FAILED)
		die("mmap io_uring SQ ring");
	res_link = "io_uring";
}

static void setup_userfaultfd(void)
{
	res_fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
	if (res_fd < 0) {
		say("SKIP userfaultfd: %s", strerror(errno));
		exit(0);
	}
	struct uffdio_api api = {.api = UFFD_API};
	if (ioctl(res_fd, UFFDIO_API, &api))
		die("UFFDIO_API");
	res_link = "userfaultfd";
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
	char buf[PATH_MAX];
	if (!strstr(fd_target(res_fd, buf, sizeof(buf)), res_link))
		vfail(&v, "fd %d: points to %s, want %s", res_fd, buf, res_link);
	long off = check_pattern(state, STATE_SIZE, seed3(0x5a7e, 0, 0));
	if (off >= 0)
		vfail(&v, "state: offset %ld: pattern mismatch", off);
	check_clocks(&v, &clk, "clock");
	if (v.failed)
		say("CHECK %d FAIL %s", seq, v.why);
	else
		say("CHECK %d OK progress=%llu resource=%s fd=%d", seq, (unsigned long long)progress, opt.resource,
		    res_fd);
}

int main(int argc, char **argv)
{
	parse_opts(argc, argv, &opt);
	if (!opt.resource)
		opt.resource = "io_uring";
	if (strcmp(opt.resource, "io_uring") == 0)
		setup_io_uring();
	else if (strcmp(opt.resource, "userfaultfd") == 0)
		setup_userfaultfd();
	else {
		say("SETUP FAIL unknown resource %s", opt.resource);
		return 2;
	}
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);
	sa.sa_handler = on_term;
	sigaction(SIGTERM, &sa, NULL);

	state = malloc(STATE_SIZE);
	if (!state)
		die("malloc");
	fill_pattern(state, STATE_SIZE, seed3(0x5a7e, 0, 0));
	struct verdict v0 = {0};
	check_clocks(&v0, &clk, "clock");
	say("RESOURCE %s fd=%d", opt.resource, res_fd);
	say("REGION state %p %u", (void *)state, STATE_SIZE);
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
			do_check(seq);
		}
		progress++;
		sleep_ms(2);
	}
}
