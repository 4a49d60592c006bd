/*
 * rewrite.c - a workload for iterative pre-dump tests: it keeps rewriting a
 * known set of pages at a set rate, and on SIGUSR1 checks every page it
 * owns against what it wrote last.
 *
 *   rewrite [--pages N] [--hot H] [--rate R]
 *
 * Memory: a data region of N pages (transparent huge pages off), and small
 * regions that are remapped all the time: "churn" (unmapped and mapped
 * again elsewhere), "mover" (moved with mremap). The version of every page
 * (0: the page must read as zeros) lives in a separate region. Page i of
 * region r at version v holds, in each of its 512 words, mix(r, i, v, word).
 *
 * The main loop writes R pages per second, cycling through H "hot" pages
 * of the data region; besides, it regularly
 *   - fills a data page with read() from a pipe (written by the kernel),
 *   - drops a data page with MADV_DONTNEED (version 0) and later rewrites it,
 *   - replaces "churn" and moves "mover".
 * Writes happen in the main loop only; a check runs between two writes, so
 * every page must match its version exactly.
 *
 * Protocol (the phaul test fixtures'): "REGION <name> 0x<addr> <len>" lines,
 * then "READY <pid>"; each SIGUSR1 prints "CHECK <seq> OK progress=<n> ..."
 * or "CHECK <seq> FAIL <reason>".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)
#define CHURN_PAGES 16
#define MOVER_PAGES 8

enum { R_DATA, R_CHURN, R_MOVER, NREGIONS };
static const char *names[NREGIONS] = { "data", "churn", "mover" };

struct region {
	char *addr;
	unsigned long pages;
	uint64_t *ver; /* in the version region */
};

static struct region reg[NREGIONS];
static volatile sig_atomic_t check_requested;
static unsigned long seq, progress;
static int pipefd[2];

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof buf - 2)
		n = sizeof buf - 2;
	buf[n++] = '\n';
	for (char *p = buf; n > 0;) {
		ssize_t w = write(1, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return;
		p += w;
		n -= w;
	}
}

static uint64_t mix(int r, unsigned long i, uint64_t v, unsigned long w)
{
	uint64_t x = ((uint64_t)r << 56) ^ ((uint64_t)i << 24) ^ (v * 0x9e3779b97f4a7c15ull) ^ (w * 0xbf58476d1ce4e5b9ull);
	x ^= x >> 31;
	x *= 0x94d049bb133111ebull;
	x ^= x >> 29;
	return x | 1; /* never zero: a zero word means a lost page */
}

static void fill(uint64_t *dst, int r, unsigned long i, uint64_t v)
{
	for (unsigned long w = 0; w < WORDS; w++)
		dst[w] = mix(r, i, v, w);
}

/* write_page gives page i of region r its next version. */
static void write_page(int r, unsigned long i)
{
	uint64_t v = reg[r].ver[i] + 1;
	if (v == 1 && r == R_DATA)
		v = 2; /* versions of dropped pages start over above 1 */
	fill((uint64_t *)(reg[r].addr + i * PAGE), r, i, v);
	reg[r].ver[i] = v;
	progress++;
}

/* kernel_write fills data page i through read() from a pipe. */
static void kernel_write(unsigned long i)
{
	static uint64_t buf[WORDS];
	uint64_t v = reg[R_DATA].ver[i] + 1;
	fill(buf, R_DATA, i, v);
	if (write(pipefd[1], buf, PAGE) != PAGE || read(pipefd[0], reg[R_DATA].addr + i * PAGE, PAGE) != PAGE) {
		say("SETUP FAIL pipe: %s", strerror(errno));
		exit(3);
	}
	reg[R_DATA].ver[i] = v;
	progress++;
}

static char *map_pages(unsigned long n)
{
	char *p = mmap(NULL, n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		say("SETUP FAIL mmap: %s", strerror(errno));
		exit(3);
	}
	madvise(p, n * PAGE, MADV_NOHUGEPAGE);
	return p;
}

/* churn replaces the churn region by a new mapping with new contents. */
static void churn(void)
{
	char *old = reg[R_CHURN].addr;
	reg[R_CHURN].addr = map_pages(CHURN_PAGES);
	if (old)
		munmap(old, CHURN_PAGES * PAGE);
	for (unsigned long i = 0; i < CHURN_PAGES; i++)
		write_page(R_CHURN, i);
}

/* move moves the mover region elsewhere with mremap, then writes a page. */
static void move(void)
{
	void *to = mmap(NULL, MOVER_PAGES * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	void *p = to == MAP_FAILED ? MAP_FAILED :
		mremap(reg[R_MOVER].addr, MOVER_PAGES * PAGE, MOVER_PAGES * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, to);
	if (p == MAP_FAILED) {
		say("SETUP FAIL mremap: %s", strerror(errno));
		exit(3);
	}
	reg[R_MOVER].addr = p;
	write_page(R_MOVER, progress % MOVER_PAGES);
}

static int check_region(int r, char *why, size_t n)
{
	static uint64_t want[WORDS];
	for (unsigned long i = 0; i < reg[r].pages; i++) {
		const uint64_t *got = (const uint64_t *)(reg[r].addr + i * PAGE);
		uint64_t v = reg[r].ver[i];
		if (v == 0) {
			for (unsigned long w = 0; w < WORDS; w++)
				if (got[w] != 0) {
					snprintf(why, n, "%s: page %lu was dropped but holds %#lx at word %lu (stale contents)",
						 names[r], i, (unsigned long)got[w], w);
					return 0;
				}
			continue;
		}
		fill(want, r, i, v);
		for (unsigned long w = 0; w < WORDS; w++) {
			if (got[w] == want[w])
				continue;
			/* Which version is it? */
			const char *kind = got[w] == 0 ? "zero (lost)" : "another version (stale)";
			for (uint64_t old = v; old-- > 0;)
				if (got[w] == mix(r, i, old, w)) {
					snprintf(why, n, "%s: page %lu holds version %lu at word %lu, want %lu (stale)",
						 names[r], i, (unsigned long)old, w, (unsigned long)v);
					return 0;
				}
			snprintf(why, n, "%s: page %lu word %lu is %s, want version %lu", names[r], i, w, kind, (unsigned long)v);
			return 0;
		}
	}
	return 1;
}

static void on_usr1(int sig)
{
	(void)sig;
	check_requested = 1;
}

static void check(void)
{
	char why[256];
	seq++;
	for (int r = 0; r < NREGIONS; r++)
		if (!check_region(r, why, sizeof why)) {
			say("CHECK %lu FAIL %s", seq, why);
			return;
		}
	unsigned long dropped = 0;
	for (unsigned long i = 0; i < reg[R_DATA].pages; i++)
		dropped += reg[R_DATA].ver[i] == 0;
	say("CHECK %lu OK progress=%lu pages=%lu dropped=%lu", seq, progress, reg[R_DATA].pages, dropped);
}

int main(int argc, char **argv)
{
	unsigned long pages = 4096, hot = 64, rate = 2000;
	for (int i = 1; i + 1 < argc; i += 2) {
		unsigned long v = strtoul(argv[i + 1], NULL, 0);
		if (!strcmp(argv[i], "--pages"))
			pages = v;
		else if (!strcmp(argv[i], "--hot"))
			hot = v;
		else if (!strcmp(argv[i], "--rate"))
			rate = v;
	}
	if (hot == 0 || hot > pages || rate == 0) {
		say("SETUP FAIL bad arguments");
		return 3;
	}
	if (pipe(pipefd) < 0) {
		say("SETUP FAIL pipe: %s", strerror(errno));
		return 3;
	}
	unsigned long nver = pages + CHURN_PAGES + MOVER_PAGES;
	uint64_t *ver = (uint64_t *)map_pages((nver * 8 + PAGE - 1) / PAGE);
	reg[R_DATA] = (struct region){ map_pages(pages), pages, ver };
	reg[R_CHURN] = (struct region){ NULL, CHURN_PAGES, ver + pages };
	reg[R_MOVER] = (struct region){ map_pages(MOVER_PAGES), MOVER_PAGES, ver + pages + CHURN_PAGES };
	for (unsigned long i = 0; i < pages; i++)
		write_page(R_DATA, i);
	for (unsigned long i = 0; i < MOVER_PAGES; i++)
		write_page(R_MOVER, i);
	churn();

	struct sigaction sa = { .sa_handler = on_usr1 };
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);
	say("REGION data %p %lu", (void *)reg[R_DATA].addr, pages * PAGE);
	say("REGION versions %p %lu", (void *)ver, nver * 8);
	say("READY %d", getpid());

	/* Hot pages spread over the region; every tick of 1 ms writes
	 * rate/1000 of them (carrying the remainder). */
	/* Orphaned (the test died without its cleanup): exit. The restored
	 * process is the test's child again, like the original. */
	pid_t parent = getppid();
	unsigned long stride = pages / hot, next = 0, tick = 0, owed = 0;
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	for (;;) {
		if (check_requested) {
			check_requested = 0;
			check();
		}
		owed += rate;
		for (; owed >= 1000; owed -= 1000) {
			write_page(R_DATA, (next % hot) * stride);
			next++;
		}
		tick++;
		if (tick % 50 == 0)
			kernel_write((tick / 50 * 7 + 1) % pages);
		if (tick % 80 == 0) {
			/* Drop a cold page; rewrite the one dropped before. */
			unsigned long d = (tick / 80 * 13 + 3) % pages;
			if (d % stride == 0)
				d++;
			unsigned long prev = ((tick / 80 - 1) * 13 + 3) % pages;
			if (prev % stride == 0)
				prev++;
			if (tick / 80 % 2 == 0 && reg[R_DATA].ver[prev] == 0)
				write_page(R_DATA, prev);
			madvise(reg[R_DATA].addr + d * PAGE, PAGE, MADV_DONTNEED);
			reg[R_DATA].ver[d] = 0;
		}
		if (tick % 100 == 0 && getppid() != parent)
			return 0;
		if (tick % 60 == 0)
			churn();
		if (tick % 70 == 0)
			move();
		t.tv_nsec += 1000000;
		if (t.tv_nsec >= 1000000000) {
			t.tv_nsec -= 1000000000;
			t.tv_sec++;
		}
		while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR)
			if (check_requested)
				break;
	}
}
