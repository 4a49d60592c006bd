/*
 * spin.c - a workload for the dirty-tracking benchmarks: it computes
 * (work units of integer arithmetic) and writes pages of a large region at
 * a set rate.
 *
 *   spin --mib M --rate R [--hot H]
 *
 * It maps M MiB (transparent huge pages off), writes every page once, and
 * prints "READY 0x<addr> <pages>". Then, every millisecond, it writes R/1000
 * pages (carrying the remainder): with --hot H, cycling over H pages spread
 * over the region; else sweeping the whole region, so that every write
 * lands on a page not written for a long time. The rest of the time it
 * runs work units. On the line "stat" on stdin it answers
 * "STAT <units> <pages written> <ns since start>"; "quit" ends it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096

static uint64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + t.tv_nsec;
}

int main(int argc, char **argv)
{
	unsigned long mib = 64, rate = 1000, hot = 0;
	for (int i = 1; i + 1 < argc; i += 2) {
		unsigned long v = strtoul(argv[i + 1], NULL, 0);
		if (!strcmp(argv[i], "--mib"))
			mib = v;
		else if (!strcmp(argv[i], "--rate"))
			rate = v;
		else if (!strcmp(argv[i], "--hot"))
			hot = v;
	}
	unsigned long pages = mib * 256;
	char *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		printf("SETUP FAIL mmap: %s\n", strerror(errno));
		return 3;
	}
	madvise(mem, pages * PAGE, MADV_NOHUGEPAGE);
	for (unsigned long i = 0; i < pages; i++)
		mem[i * PAGE] = 1;
	fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("READY %p %lu\n", (void *)mem, pages);

	unsigned long stride = hot ? pages / hot : 1, next = 0, owed = 0;
	uint64_t units = 0, written = 0, x = 88172645463325252ull;
	uint64_t start = now_ns(), tick = start + 1000000;
	char line[64];
	size_t have = 0;
	for (;;) {
		/* One work unit: some integer arithmetic. */
		for (int k = 0; k < 200; k++) {
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
		}
		units++;
		if ((units & 63) != 0)
			continue;
		uint64_t t = now_ns();
		if (t < tick)
			continue;
		tick += 1000000;
		for (owed += rate; owed >= 1000; owed -= 1000) {
			unsigned long p = hot ? (next % hot) * stride : next % pages;
			*(volatile uint64_t *)(mem + p * PAGE + 8) = x + next;
			next++;
			written++;
		}
		ssize_t n = read(0, line + have, sizeof line - 1 - have);
		if (n > 0) {
			have += n;
			line[have] = 0;
			char *nl = strchr(line, '\n');
			if (nl) {
				*nl = 0;
				if (!strcmp(line, "stat"))
					printf("STAT %lu %lu %lu\n", (unsigned long)units, (unsigned long)written, (unsigned long)(now_ns() - start));
				else if (!strcmp(line, "quit"))
					return (int)(x & 0);
				have = 0;
			}
		} else if (n == 0) {
			return 0; /* stdin closed */
		}
	}
}
