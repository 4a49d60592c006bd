/*
 * dirty.c - a test workload for the dirty-page trackers, driven line by
 * line on stdin. Every command answers exactly one line on stdout, "OK ..."
 * or "ERR ...". Regions are named with one letter (a-z); page numbers are
 * relative to the region. Transparent huge pages are disabled in every
 * region, so that the kernel tracks them page by page.
 *
 *   map R N            map N private anonymous pages (with room
 *                      to grow after them)               -> OK 0x<addr>
 *   smap R N           map N shared anonymous pages      -> OK 0x<addr>
 *   write R F C S      write C pages F, F+S, ...         -> OK
 *   kread R P          read() from a pipe into page P    -> OK
 *   dontneed R F C     madvise(MADV_DONTNEED) C pages    -> OK
 *   touch R F C        read (fault in) C pages           -> OK <sum>
 *   unmap R            munmap the region                 -> OK
 *   move R             mremap the region to a new place  -> OK 0x<addr>
 *   grow R N           mremap the region to N pages in place -> OK
 *   setuid U           drop to user and group U          -> OK
 *   quit               exit 0
 *
 * Each write stores a new value (a global counter) in every word of the
 * page's first 64 bytes, so that the contents change at every write (the
 * hash backend sees contents, not writes).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096

static struct region {
	char *addr;
	size_t pages;
} regions[26];

static uint64_t counter = 1;

static struct region *region(const char *name)
{
	if (name[0] < 'a' || name[0] > 'z' || name[1] != 0)
		return NULL;
	return &regions[name[0] - 'a'];
}

static void reply(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void reply(const char *fmt, ...)
{
	char buf[256];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
	va_end(ap);
	buf[n++] = '\n';
	if (write(1, buf, n) != n)
		exit(2);
}

static void fill(char *page)
{
	uint64_t *w = (uint64_t *)page;
	counter++;
	for (int i = 0; i < 8; i++)
		w[i] = counter * 0x9e3779b97f4a7c15ull + i;
}

int main(void)
{
	char line[256], name[8];
	unsigned long a, b, c;
	while (fgets(line, sizeof line, stdin)) {
		struct region *r;
		if (sscanf(line, "map %7s %lu", name, &a) == 2 && (r = region(name))) {
			/* Twice the size, then the upper half unmapped: room to grow. */
			char *p = mmap(NULL, 2 * a * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			if (p == MAP_FAILED) {
				reply("ERR mmap: %s", strerror(errno));
				continue;
			}
			munmap(p + a * PAGE, a * PAGE);
			madvise(p, a * PAGE, MADV_NOHUGEPAGE);
			r->addr = p;
			r->pages = a;
			reply("OK %p", p);
		} else if (sscanf(line, "smap %7s %lu", name, &a) == 2 && (r = region(name))) {
			char *p = mmap(NULL, a * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
			if (p == MAP_FAILED) {
				reply("ERR mmap: %s", strerror(errno));
				continue;
			}
			r->addr = p;
			r->pages = a;
			reply("OK %p", p);
		} else if (sscanf(line, "write %7s %lu %lu %lu", name, &a, &b, &c) == 4 && (r = region(name)) && r->addr) {
			for (unsigned long i = 0; i < b; i++)
				fill(r->addr + (a + i * c) * PAGE);
			reply("OK");
		} else if (sscanf(line, "kread %7s %lu", name, &a) == 2 && (r = region(name)) && r->addr) {
			int p[2];
			char buf[PAGE];
			fill(buf);
			if (pipe(p) < 0 || write(p[1], buf, PAGE) != PAGE) {
				reply("ERR pipe: %s", strerror(errno));
				continue;
			}
			ssize_t n = read(p[0], r->addr + a * PAGE, PAGE);
			close(p[0]);
			close(p[1]);
			if (n != PAGE)
				reply("ERR read: %zd %s", n, strerror(errno));
			else
				reply("OK");
		} else if (sscanf(line, "dontneed %7s %lu %lu", name, &a, &b) == 3 && (r = region(name)) && r->addr) {
			if (madvise(r->addr + a * PAGE, b * PAGE, MADV_DONTNEED) < 0)
				reply("ERR madvise: %s", strerror(errno));
			else
				reply("OK");
		} else if (sscanf(line, "touch %7s %lu %lu", name, &a, &b) == 3 && (r = region(name)) && r->addr) {
			unsigned long sum = 0;
			for (unsigned long i = 0; i < b; i++)
				sum += *(volatile char *)(r->addr + (a + i) * PAGE);
			reply("OK %lu", sum);
		} else if (sscanf(line, "unmap %7s", name) == 1 && strncmp(line, "unmap", 5) == 0 && (r = region(name)) && r->addr) {
			munmap(r->addr, r->pages * PAGE);
			r->addr = NULL;
			reply("OK");
		} else if (sscanf(line, "move %7s", name) == 1 && strncmp(line, "move", 4) == 0 && (r = region(name)) && r->addr) {
			/* Reserve a new place, then move the region onto it. */
			void *to = mmap(NULL, r->pages * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			void *p = to == MAP_FAILED ? MAP_FAILED :
				mremap(r->addr, r->pages * PAGE, r->pages * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, to);
			if (p == MAP_FAILED) {
				reply("ERR mremap: %s", strerror(errno));
				continue;
			}
			r->addr = p;
			reply("OK %p", p);
		} else if (sscanf(line, "grow %7s %lu", name, &a) == 2 && (r = region(name)) && r->addr) {
			void *p = mremap(r->addr, r->pages * PAGE, a * PAGE, 0);
			if (p == MAP_FAILED) {
				reply("ERR mremap: %s", strerror(errno));
				continue;
			}
			r->pages = a;
			reply("OK");
		} else if (sscanf(line, "setuid %lu", &a) == 1) {
			if (setresgid(a, a, a) < 0 || setresuid(a, a, a) < 0)
				reply("ERR setuid: %s", strerror(errno));
			else
				reply("OK");
		} else if (strcmp(line, "quit\n") == 0) {
			return 0;
		} else {
			reply("ERR bad command: %s", line);
		}
	}
	return 0;
}
