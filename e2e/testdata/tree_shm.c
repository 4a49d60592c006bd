/*
 * tree_shm.c - a parent and a child counting in turns through shared memory.
 *
 * Usage: tree_shm [--kinds anon,memfd,posix,sysv] [--posix-name /NAME]
 *
 * Each kind is one shared page holding a counter:
 *   anon   mmap(MAP_SHARED|MAP_ANONYMOUS) before the fork; it also holds
 *          the turn word the two processes wait on with a (shared) futex;
 *   memfd  a memfd mapped MAP_SHARED before the fork, and mapped a second
 *          time by the child after it (the child counts through that second
 *          mapping and checks that both of its mappings agree); the memfd
 *          stays open in both;
 *   posix  shm_open(NAME), mapped before the fork, then unlinked and closed
 *          (a deleted /dev/shm file, as multiprocessing's semaphores are);
 *   sysv   shmget(IPC_PRIVATE), attached before the fork (removed at exit).
 * The parent (role root) takes the even turns, the child the odd ones: on
 * its turn a process finds every counter at the value it expects (its last
 * one + 2), increments them all, hands the turn over and wakes the other.
 * A count lost, repeated or seen differently in two kinds fails the next
 * check; so does a stall (checked by the test through "progress").
 *
 * Preamble: "SHM sysv <shmid>" and "SHM posix <name>" name what to remove
 * if the program dies. Protocol: tree_fixture.h.
 */
#include "tree_fixture.h"

#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/shm.h>

enum { ANON, MEMFD, POSIX, SYSV, NKINDS };
static const char *kind_names[NKINDS] = {"anon", "memfd", "posix", "sysv"};

struct page {
	uint32_t turn; /* used in the anon page only */
	uint32_t pad;
	uint64_t counter;
};

static int use[NKINDS];
static struct page *pg[NKINDS]; /* the mapping each process counts through */
static struct page *memfd_first;  /* the child: its inherited memfd mapping */
static int memfd_fd = -1, shmid = -1;
static const char *posix_name;
static int me; /* 0 = parent, 1 = child */
static uint64_t turns; /* turns taken by this process */
static struct ids my_ids;
static struct clockstate clk;
static pid_t child_pid;

static long futex(uint32_t *addr, int op, uint32_t val, const struct timespec *ts)
{
	return syscall(SYS_futex, addr, op, val, ts, NULL, 0);
}

/* take_turn waits up to 100 ms for our turn; when it comes, it counts. */
static void take_turn(void)
{
	uint32_t *turn = &pg[ANON]->turn;
	uint32_t t = __atomic_load_n(turn, __ATOMIC_ACQUIRE);
	if (t != (uint32_t)me) {
		struct timespec ts = {0, 100000000L};
		futex(turn, FUTEX_WAIT, t, &ts);
		return;
	}
	uint64_t want = 2 * turns + (uint64_t)me;
	for (int k = 0; k < NKINDS; k++) {
		if (!use[k])
			continue;
		uint64_t got = pg[k]->counter;
		if (got != want)
			latch("%s: counter %llu at turn %llu of %s, want %llu (%s)", kind_names[k],
			      (unsigned long long)got, (unsigned long long)turns, me ? "child" : "root",
			      (unsigned long long)want, got < want ? "a count lost or not shared" : "counted twice");
		pg[k]->counter = want + 1;
	}
	if (me == 1 && memfd_first && memfd_first->counter != want + 1)
		latch("memfd: the child's two mappings disagree: %llu and %llu",
		      (unsigned long long)memfd_first->counter, (unsigned long long)want + 1);
	turns++;
	__atomic_store_n(turn, (uint32_t)(1 - me), __ATOMIC_RELEASE);
	futex(turn, FUTEX_WAKE, 1, NULL);
	sleep_ms(1);
}

/* check_mapping requires addr to be a shared read-write mapping of /proc/self/maps. */
static void check_mapping(struct verdict *v, const char *what, void *addr, const char *path_part)
{
	char buf[1 << 16];
	int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
	size_t have = 0;
	ssize_t n;
	while (fd >= 0 && have < sizeof(buf) - 1 && (n = read(fd, buf + have, sizeof(buf) - 1 - have)) > 0)
		have += (size_t)n;
	if (fd >= 0)
		close(fd);
	buf[have] = 0;
	for (char *l = buf; l && *l; l = strchr(l, '\n') ? strchr(l, '\n') + 1 : NULL) {
		unsigned long lo, hi;
		char perms[8];
		if (sscanf(l, "%lx-%lx %7s", &lo, &hi, perms) != 3)
			continue;
		if ((unsigned long)addr < lo || (unsigned long)addr >= hi)
			continue;
		char *eol = strchr(l, '\n');
		size_t len = eol ? (size_t)(eol - l) : strlen(l);
		if (strcmp(perms, "rw-s") != 0)
			vfail(v, "%s mapping %p is %s, want rw-s", what, addr, perms);
		if (path_part && !memmem(l, len, path_part, strlen(path_part)))
			vfail(v, "%s mapping %p: %.*s, want %s", what, addr, (int)len, l, path_part);
		return;
	}
	vfail(v, "%s mapping %p is gone", what, addr);
}

static void check_all(struct verdict *v, const char *who)
{
	check_ids(v, who, my_ids);
	check_clocks(v, &clk, who);
	check_mapping(v, "anon", pg[ANON], NULL);
	if (use[MEMFD]) {
		check_mapping(v, "memfd", pg[MEMFD], "/memfd:phaul-counter");
		if (memfd_first)
			check_mapping(v, "memfd (inherited)", memfd_first, "/memfd:phaul-counter");
		char buf[PATH_MAX];
		if (!strstr(fd_target(memfd_fd, buf, sizeof(buf)), "/memfd:phaul-counter"))
			vfail(v, "memfd fd %d points to %s", memfd_fd, buf);
		check_flags(v, "memfd", memfd_fd, O_RDWR);
	}
	if (use[POSIX])
		check_mapping(v, "posix", pg[POSIX], "/dev/shm");
	if (use[SYSV]) {
		check_mapping(v, "sysv", pg[SYSV], "SYSV");
		struct shmid_ds ds;
		if (shmctl(shmid, IPC_STAT, &ds))
			vfail(v, "sysv: shmctl(%d, IPC_STAT): %s", shmid, strerror(errno));
		else if (ds.shm_nattch != 2)
			vfail(v, "sysv: segment %d has %lu attaches, want 2", shmid, (unsigned long)ds.shm_nattch);
	}
}

static void child_check(int seq, struct verdict *v, char *kv, size_t len)
{
	(void)seq;
	check_all(v, "child");
	kvf(kv, len, "progress=%llu", (unsigned long long)turns);
}

static void *map_shared(int fd, const char *what)
{
	void *p = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | (fd < 0 ? MAP_ANONYMOUS : 0), fd, 0);
	if (p == MAP_FAILED)
		die("mmap %s", what);
	return p;
}

static void cleanup_ipc(void)
{
	if (use[SYSV] && shmid >= 0) {
		shmdt(pg[SYSV]);
		shmctl(shmid, IPC_RMID, NULL);
	}
}

int main(int argc, char **argv)
{
	struct opts o;
	const char *kinds = "anon,memfd";
	while (argc > 2) {
		if (strcmp(argv[1], "--kinds") == 0)
			kinds = argv[2];
		else if (strcmp(argv[1], "--posix-name") == 0)
			posix_name = argv[2];
		else
			break;
		argv[2] = argv[0];
		argc -= 2;
		argv += 2;
	}
	parse_opts(argc, argv, &o);
	for (int k = 0; k < NKINDS; k++)
		use[k] = strstr(kinds, kind_names[k]) != NULL;
	use[ANON] = 1; /* it holds the turn */
	if (use[POSIX] && (!posix_name || posix_name[0] != '/')) {
		say("SETUP FAIL --kinds posix needs --posix-name /NAME");
		return 2;
	}
	tree_root_signals();
	my_ids = ids_now();
	pg[ANON] = map_shared(-1, "anon");
	if (use[MEMFD]) {
		memfd_fd = memfd_create("phaul-counter", MFD_CLOEXEC);
		if (memfd_fd < 0 || ftruncate(memfd_fd, PAGE))
			die("memfd_create");
		pg[MEMFD] = map_shared(memfd_fd, "memfd");
	}
	if (use[POSIX]) {
		int fd = shm_open(posix_name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
		if (fd < 0 || ftruncate(fd, PAGE))
			die("shm_open %s", posix_name);
		say("SHM posix %s", posix_name);
		pg[POSIX] = map_shared(fd, "posix");
		close(fd);
		shm_unlink(posix_name);
	}
	if (use[SYSV]) {
		shmid = shmget(IPC_PRIVATE, PAGE, IPC_CREAT | 0600);
		if (shmid < 0)
			die("shmget");
		say("SHM sysv %d", shmid);
		pg[SYSV] = shmat(shmid, NULL, 0);
		if (pg[SYSV] == (void *)-1) {
			shmctl(shmid, IPC_RMID, NULL);
			die("shmat");
		}
	}
	tree_report_pipe();
	tree_add("root", getpid(), 0);
	child_pid = fork();
	if (child_pid < 0) {
		cleanup_ipc();
		die("fork");
	}
	if (child_pid == 0) {
		me = 1;
		close(rep_rd);
		tree_member_signals();
		my_ids = ids_now();
		if (use[MEMFD]) {
			memfd_first = pg[MEMFD];
			pg[MEMFD] = map_shared(memfd_fd, "memfd (second mapping)");
		}
		tree_say_to_root("UP child %d", (int)getpid());
		for (;;) {
			tree_member_service("child", child_check);
			if (term_requested)
				_exit(0);
			take_turn();
		}
	}
	close(rep_wr);
	tree_add("child", child_pid, 1);
	char line[PIPE_BUF + 1];
	if (tree_read_line(line, sizeof(line), mono_now() + 10) || strncmp(line, "UP ", 3) != 0) {
		cleanup_ipc();
		die("the child did not come up");
	}
	struct verdict v0 = {0};
	check_clocks(&v0, &clk, "root");
	tree_say_procs();
	for (int k = 0; k < NKINDS; k++)
		if (use[k])
			say("REGION %s %p %d", kind_names[k], (void *)pg[k], PAGE);
	say("READY %d", (int)getpid());

	int handled = 0, seq = 0;
	for (;;) {
		if (term_requested) {
			int ended = end_children(&child_pid, 1);
			cleanup_ipc();
			say("EXIT %d children_ended=%d progress=%llu", o.exit_code, ended, (unsigned long long)turns);
			exit(o.exit_code);
		}
		if (usr1_count != handled) {
			handled = usr1_count;
			seq++;
			struct verdict v = {0};
			char kv[4096] = "";
			if (latched_set)
				vfail(&v, "%s", latched);
			check_all(&v, "root");
			tree_collect(seq, &v, kv, sizeof(kv));
			if (v.failed)
				say("CHECK %d FAIL %s", seq, v.why);
			else
				say("CHECK %d OK progress=%llu counter=%llu %s", seq, (unsigned long long)turns,
				    (unsigned long long)pg[ANON]->counter, kv);
		}
		take_turn();
	}
}
