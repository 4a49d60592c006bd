/*
 * shmem.c - a workload holding shared memory objects of every kind phaul
 * saves once per object, and checking from inside, after restore, that
 * their contents are intact and that the mappings and descriptors of one
 * object still share it: each check verifies, through one alias, a word
 * the previous check wrote through another, then writes the next one.
 *
 *   memfd      "phaul-shm", 3 pages + 1234 bytes, sealed F_SEAL_SHRINK|
 *              F_SEAL_GROW, mapped MAP_SHARED at two addresses (A, B) and
 *              kept as a descriptor at offset 777: written through A, read
 *              through B and pread; the bytes of the last page past the
 *              size (which only a mapping shows) are checked too.
 *   sealed     memfd "phaul-shm-ro", 2 pages, sealed F_SEAL_WRITE|SHRINK|
 *              GROW|SEAL and mapped read-only: mprotect(PROT_WRITE) must
 *              fail (no VM_MAYWRITE), contents and seals intact.
 *   deleted    --tag-del in /dev/shm: 2 pages + 100 bytes, mode 0640,
 *              mapped shared, unlinked, descriptor kept at offset 100.
 *   semaphore  sem_open'ed as --tag-sem (value 5), then sem_unlink'ed: the
 *              /dev/shm/sem.* file Python's multiprocessing leaves deleted.
 *   posix      --tag-posix: shm_open'ed, 2 pages, mapped shared, name kept
 *              (a plain shared file mapping), descriptor kept.
 *   sysv       segment of --sysv-key, 3 pages + 500 bytes, mode 0640,
 *              attached read-write (its third page mprotect'ed read-only,
 *              so three mappings) and again SHM_RDONLY: written through the
 *              first, read through the second; IPC_STAT by the shmid kept
 *              in memory must find it with its key and size (the same
 *              shmid after restore); reports shmid= and the creator's
 *              sysv_cpid=.
 *   anon       16 pages MAP_SHARED|MAP_ANONYMOUS, pages 0-1 unmapped,
 *              pages 8-11 mremap'ed elsewhere, and the whole object mapped
 *              again through /proc/self/map_files (descriptor kept): every
 *              page read through that alias, written through the others.
 *
 * --refuse hugetlb adds a hugetlbfs memfd descriptor, --refuse
 * private-memfd a MAP_PRIVATE mapping of a memfd: dump must refuse them.
 * SIGTERM removes the POSIX object and the SysV segment.
 *
 * Build: gcc -O2 -Wall shmem.c -o shmem
 * Protocol: see fixture.h.
 */
#include "fixture.h"

#include <semaphore.h>
#include <sys/mman.h>
#include <sys/shm.h>

#define MFD_SIZE (3 * PAGE + 1234)
#define MFD_MAP (4 * PAGE)
#define RO_SIZE (2 * PAGE)
#define DEL_SIZE (2 * PAGE + 100)
#define DEL_MAP (3 * PAGE)
#define POSIX_SIZE (2 * PAGE)
#define SYSV_SIZE (3 * PAGE + 500)
#define SYSV_MAP (4 * PAGE)
#define ANON_PAGES 16

enum { TAG_MFD = 1, TAG_RO, TAG_DEL, TAG_POSIX, TAG_SYSV, TAG_ANON };

static int exit_code = 7;
static const char *tag;
static const char *refuse = "";
static key_t sysv_key;

static int mfd, rofd, dfd, pfd, afd, hugefd = -1;
static uint8_t *mA, *mB, *ro, *dmap, *pmap, *sv1, *sv2, *anon, *moved, *alias, *privmap;
static sem_t *sem;
static int shmid;
static char del_path[256], posix_name[256], sem_name[256];
static uint64_t gen; /* the word the last check wrote everywhere */
static uint64_t progress, last_progress;

static void parse_args(int argc, char **argv)
{
	for (int i = 1; i + 1 < argc; i += 2) {
		const char *a = argv[i], *v = argv[i + 1];
		if (strcmp(a, "--tag") == 0)
			tag = v;
		else if (strcmp(a, "--sysv-key") == 0)
			sysv_key = (key_t)strtol(v, NULL, 0);
		else if (strcmp(a, "--refuse") == 0)
			refuse = v;
		else if (strcmp(a, "--exit-code") == 0)
			exit_code = atoi(v);
		else {
			say("SETUP FAIL unknown option %s", a);
			exit(2);
		}
	}
	if (argc % 2 == 0 || !tag || !sysv_key) {
		say("SETUP FAIL usage: shmem --tag NAME --sysv-key KEY [--refuse hugetlb|private-memfd]");
		exit(2);
	}
}

static uint8_t *map(size_t len, int prot, int flags, int fd, const char *what)
{
	void *p = mmap(NULL, len, prot, flags, fd, 0);
	if (p == MAP_FAILED)
		die("mmap %s", what);
	return p;
}

/* maps_line finds the /proc/self/maps line of the mapping holding addr. */
static int maps_line(const void *addr, char *out, size_t len)
{
	FILE *f = fopen("/proc/self/maps", "r");
	if (!f)
		return -1;
	char line[512];
	int found = -1;
	while (fgets(line, sizeof(line), f)) {
		unsigned long s, e;
		if (sscanf(line, "%lx-%lx", &s, &e) == 2 && (unsigned long)addr >= s && (unsigned long)addr < e) {
			line[strcspn(line, "\n")] = 0;
			snprintf(out, len, "%s", line);
			found = 0;
			break;
		}
	}
	fclose(f);
	return found;
}

/* want_map checks that addr's mapping has permissions perms and ends with name. */
static void want_map(struct verdict *v, const char *what, const void *addr, const char *perms, const char *name)
{
	char line[512];
	if (maps_line(addr, line, sizeof(line))) {
		vfail(v, "%s: %p is not mapped", what, addr);
		return;
	}
	char p[8] = {0};
	sscanf(line, "%*s %7s", p);
	size_t n = strlen(line), m = strlen(name);
	if (strcmp(p, perms) != 0 || n < m || strcmp(line + n - m, name) != 0)
		vfail(v, "%s: maps line \"%s\", want %s ... %s", what, line, perms, name);
}

static void want_link(struct verdict *v, const char *what, int fd, const char *want)
{
	char buf[PATH_MAX];
	if (strcmp(fd_target(fd, buf, sizeof(buf)), want) != 0)
		vfail(v, "%s: fd %d is %s, want %s", what, fd, buf, want);
}

/* want_pattern checks len bytes at p (offset off of region tag). */
static void want_pattern(struct verdict *v, const char *what, const uint8_t *p, size_t len, int tg, size_t off)
{
	long bad = check_pattern(p, len, seed3((uint64_t)tg, off / PAGE, 0));
	if (bad >= 0)
		vfail(v, "%s: pattern broken at offset %#lx", what, (unsigned long)(off + (size_t)bad));
}

static uint64_t word(const uint8_t *p) { return *(const volatile uint64_t *)p; }
static void set_word(uint8_t *p, uint64_t x) { *(volatile uint64_t *)p = x; }

static uint64_t pread_word(int fd, off_t off)
{
	uint64_t x = ~0ull;
	if (pread(fd, &x, 8, off) != 8)
		return ~0ull - 1;
	return x;
}

/* Pattern layout: every page of the regions that checks write holds gen
 * in its first word, and a pattern of its region and page after it. */
static void check_pages(struct verdict *v, const char *what, const uint8_t *p, size_t len, int tg, size_t first)
{
	for (size_t off = 0; off < len; off += PAGE) {
		size_t page = first + off / PAGE;
		if (word(p + off) != gen)
			vfail(v, "%s: page %zu: word 0 is %llu, want %llu", what, page, (unsigned long long)word(p + off),
			      (unsigned long long)gen);
		long bad = check_pattern(p + off + 8, PAGE - 8, seed3((uint64_t)tg, page, 0) + 1);
		if (bad >= 0)
			vfail(v, "%s: page %zu: pattern broken at %ld", what, page, bad + 8);
	}
}

static void set_pages(uint8_t *p, size_t len, uint64_t g)
{
	for (size_t off = 0; off < len; off += PAGE)
		set_word(p + off, g);
}

static void setup(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);
	sa.sa_handler = on_term;
	sigaction(SIGTERM, &sa, NULL);

	/* memfd at two addresses, and its descriptor. */
	if ((mfd = memfd_create("phaul-shm", MFD_CLOEXEC | MFD_ALLOW_SEALING)) < 0)
		die("memfd_create");
	if (ftruncate(mfd, MFD_SIZE))
		die("ftruncate memfd");
	mA = map(MFD_MAP, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, "memfd A");
	mB = map(MFD_MAP, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, "memfd B");
	if (fcntl(mfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW))
		die("seal memfd");
	if (lseek(mfd, 777, SEEK_SET) != 777)
		die("lseek memfd");

	/* A write-sealed memfd, mapped read-only. */
	if ((rofd = memfd_create("phaul-shm-ro", MFD_CLOEXEC | MFD_ALLOW_SEALING)) < 0)
		die("memfd_create ro");
	if (ftruncate(rofd, RO_SIZE))
		die("ftruncate ro");
	uint8_t *w = map(RO_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, rofd, "ro (writing)");
	fill_pattern(w, RO_SIZE, seed3(TAG_RO, 0, 0));
	munmap(w, RO_SIZE);
	if (fcntl(rofd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL))
		die("seal ro memfd");
	ro = map(RO_SIZE, PROT_READ, MAP_SHARED, rofd, "ro");

	/* A deleted /dev/shm file, mapped, and its descriptor. */
	snprintf(del_path, sizeof(del_path), "/dev/shm/%s-del", tag);
	if ((dfd = open(del_path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0640)) < 0)
		die("create %s", del_path);
	if (fchmod(dfd, 0640) || ftruncate(dfd, DEL_SIZE))
		die("ftruncate %s", del_path);
	dmap = map(DEL_MAP, PROT_READ | PROT_WRITE, MAP_SHARED, dfd, "deleted file");
	if (unlink(del_path))
		die("unlink %s", del_path);
	if (lseek(dfd, 100, SEEK_SET) != 100)
		die("lseek deleted file");

	/* A POSIX semaphore whose file is unlinked at once. */
	snprintf(sem_name, sizeof(sem_name), "/%s-sem", tag);
	if ((sem = sem_open(sem_name, O_CREAT | O_EXCL, 0600, 5)) == SEM_FAILED)
		die("sem_open %s", sem_name);
	if (sem_unlink(sem_name))
		die("sem_unlink");

	/* A POSIX shared memory object that keeps its name. */
	snprintf(posix_name, sizeof(posix_name), "/%s-posix", tag);
	if ((pfd = shm_open(posix_name, O_RDWR | O_CREAT | O_EXCL, 0600)) < 0)
		die("shm_open %s", posix_name);
	if (ftruncate(pfd, POSIX_SIZE))
		die("ftruncate posix");
	pmap = map(POSIX_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, pfd, "posix");

	/* A SysV segment, attached twice. */
	if ((shmid = shmget(sysv_key, SYSV_SIZE, IPC_CREAT | IPC_EXCL | 0640)) < 0)
		die("shmget key %#x", (unsigned)sysv_key);
	if ((sv1 = shmat(shmid, NULL, 0)) == (void *)-1)
		die("shmat");
	if (mprotect(sv1 + 2 * PAGE, PAGE, PROT_READ))
		die("mprotect sysv");
	if ((sv2 = shmat(shmid, NULL, SHM_RDONLY)) == (void *)-1)
		die("shmat read-only");

	/* Shared anonymous memory, cut, moved and mapped again whole. */
	anon = map(ANON_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, "anon");
	if (munmap(anon, 2 * PAGE))
		die("munmap anon head");
	uint8_t *hole = map(4 * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, "hole");
	moved = mremap(anon + 8 * PAGE, 4 * PAGE, 4 * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, hole);
	if (moved == MAP_FAILED)
		die("mremap anon");
	char path[128];
	snprintf(path, sizeof(path), "/proc/self/map_files/%lx-%lx", (unsigned long)(anon + 2 * PAGE),
		 (unsigned long)(anon + 8 * PAGE));
	if ((afd = open(path, O_RDWR | O_CLOEXEC)) < 0)
		die("open %s", path);
	alias = map(ANON_PAGES * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, afd, "anon alias");

	if (strcmp(refuse, "hugetlb") == 0) {
		if ((hugefd = memfd_create("phaul-huge", MFD_CLOEXEC | MFD_HUGETLB)) < 0) {
			say("SKIP memfd_create(MFD_HUGETLB): %s", strerror(errno));
			exit(0);
		}
	} else if (strcmp(refuse, "private-memfd") == 0) {
		privmap = map(PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, mfd, "private memfd");
		privmap[100] = 1;
	} else if (refuse[0]) {
		say("SETUP FAIL unknown --refuse %s", refuse);
		exit(2);
	}
}

/* reseed writes every page the way check_pages wants it for gen 0; run
 * once at setup. */
static void reseed(uint8_t *p, size_t len, int tg)
{
	for (size_t off = 0; off < len; off += PAGE) {
		set_word(p + off, 0);
		fill_pattern(p + off + 8, PAGE - 8, seed3((uint64_t)tg, off / PAGE, 0) + 1);
	}
}

static void do_check(int seq)
{
	struct verdict v = {0};
	char want[300];
	if (latched_set)
		vfail(&v, "%s", latched);
	if (seq > 1 && progress <= last_progress)
		vfail(&v, "progress did not advance: %llu <= %llu", (unsigned long long)progress,
		      (unsigned long long)last_progress);
	last_progress = progress;

	/* memfd: written through A by the last check, read through B and pread. */
	check_pages(&v, "memfd B", mB, MFD_MAP, TAG_MFD, 0);
	if (memcmp(mA, mB, MFD_MAP) != 0)
		vfail(&v, "memfd: the two mappings differ");
	for (off_t off = 0; off < MFD_SIZE; off += PAGE)
		if (pread_word(mfd, off) != gen)
			vfail(&v, "memfd: pread at %#lx does not see the mapping", (long)off);
	struct stat st;
	if (fstat(mfd, &st) || st.st_size != MFD_SIZE)
		vfail(&v, "memfd: size %ld, want %d", (long)st.st_size, MFD_SIZE);
	if (fcntl(mfd, F_GET_SEALS) != (F_SEAL_SHRINK | F_SEAL_GROW))
		vfail(&v, "memfd: seals %#x", fcntl(mfd, F_GET_SEALS));
	if (lseek(mfd, 0, SEEK_CUR) != 777 || (fcntl(mfd, F_GETFL) & O_ACCMODE) != O_RDWR)
		vfail(&v, "memfd: offset %ld, flags %#x", (long)lseek(mfd, 0, SEEK_CUR), fcntl(mfd, F_GETFL));
	want_link(&v, "memfd", mfd, "/memfd:phaul-shm (deleted)");
	want_map(&v, "memfd A", mA, "rw-s", "/memfd:phaul-shm (deleted)");
	want_map(&v, "memfd B", mB, "rw-s", "/memfd:phaul-shm (deleted)");

	/* Sealed memfd, read-only. */
	want_pattern(&v, "sealed memfd", ro, RO_SIZE, TAG_RO, 0);
	if (fcntl(rofd, F_GET_SEALS) != (F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL))
		vfail(&v, "sealed memfd: seals %#x", fcntl(rofd, F_GET_SEALS));
	if (mprotect(ro, RO_SIZE, PROT_READ | PROT_WRITE) == 0)
		vfail(&v, "sealed memfd: its read-only mapping could be made writable");
	want_map(&v, "sealed memfd", ro, "r--s", "/memfd:phaul-shm-ro (deleted)");

	/* Deleted file: mapping and descriptor. */
	check_pages(&v, "deleted file", dmap, DEL_MAP, TAG_DEL, 0);
	for (off_t off = 0; off < DEL_SIZE; off += PAGE)
		if (pread_word(dfd, off) != gen)
			vfail(&v, "deleted file: pread at %#lx does not see the mapping", (long)off);
	if (fstat(dfd, &st) || st.st_size != DEL_SIZE || (st.st_mode & 07777) != 0640 || st.st_nlink != 0)
		vfail(&v, "deleted file: size %ld mode %#o links %ld", (long)st.st_size, st.st_mode & 07777,
		      (long)st.st_nlink);
	if (lseek(dfd, 0, SEEK_CUR) != 100)
		vfail(&v, "deleted file: offset %ld", (long)lseek(dfd, 0, SEEK_CUR));
	snprintf(want, sizeof(want), "%s (deleted)", del_path);
	want_link(&v, "deleted file", dfd, want);
	want_map(&v, "deleted file", dmap, "rw-s", want);

	/* Semaphore. */
	int val = -1;
	if (sem_wait(sem) || sem_post(sem) || sem_getvalue(sem, &val) || val != 5)
		vfail(&v, "semaphore: value %d, want 5 (%s)", val, strerror(errno));
	/* glibc made it under a temporary name, then linked it as sem_name. */
	want_map(&v, "semaphore", sem, "rw-s", " (deleted)");
	if (maps_line(sem, want, sizeof(want)) || !strstr(want, "/dev/shm/sem."))
		vfail(&v, "semaphore: maps line \"%s\"", want);

	/* POSIX object with its name. */
	check_pages(&v, "posix", pmap, POSIX_SIZE, TAG_POSIX, 0);
	if (pread_word(pfd, PAGE) != gen)
		vfail(&v, "posix: pread does not see the mapping");
	snprintf(want, sizeof(want), "/dev/shm%s", posix_name);
	want_link(&v, "posix", pfd, want);
	want_map(&v, "posix", pmap, "rw-s", want);

	/* SysV: written through sv1, read through sv2. */
	check_pages(&v, "sysv (read-only attachment)", sv2, SYSV_MAP, TAG_SYSV, 0);
	struct shmid_ds ds = {0};
	if (shmctl(shmid, IPC_STAT, &ds))
		vfail(&v, "sysv: IPC_STAT of shmid %d: %s", shmid, strerror(errno));
	else if (ds.shm_perm.__key != sysv_key || ds.shm_segsz != SYSV_SIZE || (ds.shm_perm.mode & 0777) != 0640)
		vfail(&v, "sysv: shmid %d has key %#x, %zu bytes, mode %#o", shmid, (unsigned)ds.shm_perm.__key,
		      (size_t)ds.shm_segsz, ds.shm_perm.mode & 0777);
	if (mprotect(sv2, SYSV_MAP, PROT_READ | PROT_WRITE) == 0)
		vfail(&v, "sysv: the SHM_RDONLY attachment could be made writable");
	snprintf(want, sizeof(want), "/SYSV%08x (deleted)", (unsigned)sysv_key);
	want_map(&v, "sysv 1", sv1, "rw-s", want);
	want_map(&v, "sysv 1 page 2", sv1 + 2 * PAGE, "r--s", want);
	want_map(&v, "sysv 1 page 3", sv1 + 3 * PAGE, "rw-s", want);
	want_map(&v, "sysv 2", sv2, "r--s", want);

	/* Anonymous: every page through the alias, the mapped ones also where
	 * they are mapped. */
	check_pages(&v, "anon (alias)", alias, ANON_PAGES * PAGE, TAG_ANON, 0);
	if (memcmp(anon + 2 * PAGE, alias + 2 * PAGE, 6 * PAGE) || memcmp(moved, alias + 8 * PAGE, 4 * PAGE) ||
	    memcmp(anon + 12 * PAGE, alias + 12 * PAGE, 4 * PAGE))
		vfail(&v, "anon: a mapping differs from the alias");
	want_map(&v, "anon", anon + 2 * PAGE, "rw-s", "/dev/zero (deleted)");
	want_map(&v, "anon moved", moved, "rw-s", "/dev/zero (deleted)");
	want_map(&v, "anon alias", alias, "rw-s", "/dev/zero (deleted)");
	if (maps_line(anon + 8 * PAGE, want, sizeof(want)) == 0 && strstr(want, "zero"))
		vfail(&v, "anon: the moved-away pages are still mapped: %s", want);

	/* Next generation, written through the other aliases. */
	gen++;
	set_pages(mA, MFD_MAP, gen);
	set_pages(dmap, DEL_MAP, gen);
	set_pages(pmap, POSIX_SIZE, gen);
	set_pages(sv1, 2 * PAGE, gen);
	set_pages(alias + 2 * PAGE, PAGE, gen); /* page 2 through the alias too */
	if (mprotect(sv1 + 2 * PAGE, PAGE, PROT_READ | PROT_WRITE))
		vfail(&v, "sysv: mprotect page 2 writable: %s", strerror(errno));
	set_pages(sv1 + 2 * PAGE, 2 * PAGE, gen);
	if (mprotect(sv1 + 2 * PAGE, PAGE, PROT_READ))
		vfail(&v, "sysv: mprotect page 2 back: %s", strerror(errno));
	set_pages(alias, 2 * PAGE, gen); /* pages 0-1: mapped nowhere else */
	set_pages(anon + 2 * PAGE, 6 * PAGE, gen);
	set_pages(moved, 4 * PAGE, gen);
	set_pages(anon + 12 * PAGE, 4 * PAGE, gen);

	if (v.failed)
		say("CHECK %d FAIL %s", seq, v.why);
	else
		say("CHECK %d OK progress=%llu gen=%llu shmid=%d sysv_cpid=%d", seq, (unsigned long long)progress,
		    (unsigned long long)gen, shmid, (int)ds.shm_cpid);
}

int main(int argc, char **argv)
{
	parse_args(argc, argv);
	setup();
	reseed(mA, MFD_MAP, TAG_MFD);
	reseed(dmap, DEL_MAP, TAG_DEL);
	reseed(pmap, POSIX_SIZE, TAG_POSIX);
	mprotect(sv1 + 2 * PAGE, PAGE, PROT_READ | PROT_WRITE);
	reseed(sv1, SYSV_MAP, TAG_SYSV);
	mprotect(sv1 + 2 * PAGE, PAGE, PROT_READ);
	reseed(alias, ANON_PAGES * PAGE, TAG_ANON);
	say("REGION memfd %p %d", (void *)mA, MFD_MAP);
	say("REGION anon %p %d", (void *)alias, ANON_PAGES * PAGE);
	say("READY %d", (int)getpid());
	int handled = 0, seq = 0;
	for (;;) {
		if (term_requested) {
			shm_unlink(posix_name);
			shmctl(shmid, IPC_RMID, NULL);
			say("EXIT %d progress=%llu", exit_code, (unsigned long long)progress);
			exit(exit_code);
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
