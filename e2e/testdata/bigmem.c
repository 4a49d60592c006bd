/*
 * bigmem.c - populates --mib N MiB (default 256) of anonymous memory with
 * heap-like data for the dump/restore benchmarks: 64-byte "objects" with a
 * small header, pointer-like words into the region, counters, short text,
 * zero fields and a random word. Pages are never all zero; the data
 * compresses partly. The self-check re-hashes every MiB against the hashes
 * taken after the fill. The memory is not changed after READY.
 *
 * Build: gcc -O2 -Wall bigmem.c -o bigmem
 * Protocol: see fixture.h.
 */
#include "fixture.h"

#include <sys/mman.h>

#define MIB (1ul << 20)

static struct opts opt;
static uint8_t *mem;
static uint64_t *hashes;
static uint64_t progress, last_progress;

static const char *words[] = {"request", "session", "buffer", "handler", "cache", "entry", "node", "value"};

static char names[1000][16];

static void fill(void)
{
	for (int i = 0; i < 1000; i++)
		snprintf(names[i], sizeof(names[i]), "%s-%d", words[mix64((uint64_t)i) % 8], i);
	size_t n = (size_t)opt.mib * MIB;
	uintptr_t base = (uintptr_t)mem;
	for (size_t off = 0; off < n; off += 64) {
		uint64_t *o = (uint64_t *)(mem + off);
		uint64_t id = off / 64;
		uint64_t r = mix64(id);
		o[0] = 0x0000100000000000ull | (id % 13) << 8 | (r & 7); /* header */
		o[1] = base + ((r >> 8) % n & ~15ul);                     /* pointer */
		o[2] = id & 0xffff;                                        /* counter */
		o[3] = 0;
		memcpy(&o[4], names[id % 1000], 16);
		o[6] = mix64(r); /* incompressible */
		o[7] = (r >> 40) & 1 ? 0 : id;
	}
}

static uint64_t hash_mib(size_t i)
{
	const uint64_t *w = (const uint64_t *)(mem + i * MIB);
	uint64_t h = 0xcbf29ce484222325ull;
	for (size_t k = 0; k < MIB / 8; k++)
		h = (h ^ w[k]) * 0x100000001b3ull;
	return h;
}

int main(int argc, char **argv)
{
	parse_opts(argc, argv, &opt);
	if (opt.mib <= 0)
		opt.mib = 256;
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);
	sa.sa_handler = on_term;
	sigaction(SIGTERM, &sa, NULL);

	mem = mmap(NULL, (size_t)opt.mib * MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	hashes = malloc((size_t)opt.mib * sizeof(uint64_t));
	if (mem == MAP_FAILED || !hashes)
		die("allocate %ld MiB", opt.mib);
	fill();
	for (long i = 0; i < opt.mib; i++)
		hashes[i] = hash_mib((size_t)i);
	say("REGION mem %p %lu", (void *)mem, (unsigned long)opt.mib * MIB);
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
			for (long i = 0; i < opt.mib; i++)
				if (hash_mib((size_t)i) != hashes[i]) {
					vfail(&v, "mem: MiB %ld (at %p) does not hash as before", i, (void *)(mem + i * MIB));
					if (v.failed >= 3)
						break;
				}
			if (v.failed)
				say("CHECK %d FAIL %s", seq, v.why);
			else
				say("CHECK %d OK progress=%llu mib=%ld", seq, (unsigned long long)progress, opt.mib);
		}
		progress++;
		sleep_ms(10);
	}
}
