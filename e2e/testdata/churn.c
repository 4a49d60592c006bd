/*
 * churn.c - a process whose mappings keep changing: 32 slots, each an
 * anonymous mapping of 1 to 64 pages filled with a pattern of its own;
 * every millisecond one slot is unmapped and mapped again with another size
 * and a new pattern (so mappings appear, vanish, grow and shrink while a
 * migration copies the process). The self-check verifies every slot.
 *
 * Build: gcc -O2 -Wall churn.c -o churn
 * Protocol: see fixture.h.
 */
#include "fixture.h"

#include <sys/mman.h>

#define SLOTS 32

struct slot {
	uint8_t *p;
	size_t len;
	uint64_t gen;
};

static struct slot slots[SLOTS];
static uint64_t gens, progress, last_progress;

static void remap(int k)
{
	struct slot *s = &slots[k];
	if (s->p != NULL && munmap(s->p, s->len) != 0)
		die("munmap");
	s->gen = ++gens;
	s->len = (size_t)(1 + mix64(s->gen) % 64) * PAGE;
	s->p = mmap(NULL, s->len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (s->p == MAP_FAILED)
		die("mmap %zu bytes", s->len);
	fill_pattern(s->p, s->len, seed3(0xc4u, (uint64_t)k, s->gen));
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
	for (int k = 0; k < SLOTS; k++)
		remap(k);
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
			for (int k = 0; k < SLOTS; k++) {
				struct slot *s = &slots[k];
				long bad = check_pattern(s->p, s->len, seed3(0xc4u, (uint64_t)k, s->gen));
				if (bad >= 0)
					vfail(&v, "slot %d (%p, %zu bytes, generation %llu): wrong at offset %ld", k,
					      (void *)s->p, s->len, (unsigned long long)s->gen, bad);
			}
			if (v.failed)
				say("CHECK %d FAIL %s", seq, v.why);
			else
				say("CHECK %d OK progress=%llu remaps=%llu", seq, (unsigned long long)progress,
				    (unsigned long long)gens);
		}
		remap((int)(progress % SLOTS));
		progress++;
		sleep_ms(1);
	}
}
