#!/usr/bin/env python3
"""A multiprocessing pool that must finish its work across a dump/restore.

The root starts a Pool of 3 workers (context "fork") and feeds it --tasks
tasks (default 240) through imap, each taking --task-ms (default 20 ms) in
a worker and returning (index, a digest of the index, the worker's PID). The
root checks every result: in order, the right digest, computed by one of the
three workers the pool started with (a pool that lost a worker starts a new
one: that must not happen).

Besides the pool's processes, the tree holds what multiprocessing uses:
pipes between the root and the workers, POSIX semaphores (sem_open, then
unlinked: shared mappings of deleted /dev/shm files) and the pool's three
threads in the root.

Fixture protocol (testdata/fixture.h): "PROC root|workerK <pid>" lines,
"READY <pid>", one "CHECK <seq> OK|FAIL ..." line per SIGUSR1 (progress =
results received), "DONE results=N" once every result is in and correct,
and on SIGTERM "EXIT 7 ..." after the pool is closed and joined.
"""

import argparse
import hashlib
import multiprocessing
import os
import signal
import sys
import time


def say(line):
    """Print one protocol line with a single write."""
    os.write(1, (line.replace("\n", " ") + "\n").encode())


def digest(i):
    return hashlib.sha256(b"task %d" % i).hexdigest()[:16]


def work(args):
    i, delay = args
    time.sleep(delay)
    return i, digest(i), os.getpid()


class Root:
    def __init__(self, ntasks, delay):
        self.ntasks = ntasks
        self.delay = delay
        self.results = []
        self.latched = None
        self.usr1 = 0
        self.term = False
        self.ppid = os.getppid()

    def latch(self, msg):
        if self.latched is None:
            self.latched = msg

    def take(self, r):
        i, d, pid = r
        want = len(self.results)
        if i != want:
            self.latch("result %d arrived as number %d" % (i, want))
        elif d != digest(i):
            self.latch("result %d: digest %s, want %s" % (i, d, digest(i)))
        elif pid not in self.workers:
            self.latch("result %d computed by %d, not one of the workers %s" % (i, pid, sorted(self.workers)))
        self.results.append(r)

    def check(self, seq):
        why = []
        if self.latched:
            why.append(self.latched)
        if os.getpid() != self.pid:
            why.append("getpid() %d, want %d" % (os.getpid(), self.pid))
        if os.getppid() != self.ppid:
            why.append("getppid() %d, want %d" % (os.getppid(), self.ppid))
        now = sorted(p.pid for p in multiprocessing.active_children())
        if now != sorted(self.workers):
            why.append("pool workers %s, want %s" % (now, sorted(self.workers)))
        per = {}
        for _, _, pid in self.results:
            per[pid] = per.get(pid, 0) + 1
        if why:
            say("CHECK %d FAIL %s" % (seq, "; ".join(why)))
        else:
            say("CHECK %d OK progress=%d %s" % (
                seq, len(self.results), " ".join("worker_%d=%d" % (p, n) for p, n in sorted(per.items()))))

    def run(self):
        self.pid = os.getpid()
        ctx = multiprocessing.get_context("fork")
        pool = ctx.Pool(3)
        self.workers = {p.pid for p in multiprocessing.active_children()}
        if len(self.workers) != 3:
            say("SETUP FAIL the pool has %d workers" % len(self.workers))
            pool.terminate()
            return 3
        signal.signal(signal.SIGUSR1, self.on_usr1)
        signal.signal(signal.SIGTERM, self.on_term)
        say("PROC root %d" % self.pid)
        for k, pid in enumerate(sorted(self.workers)):
            say("PROC worker%d %d" % (k + 1, pid))
        say("READY %d" % self.pid)
        it = pool.imap(work, ((i, self.delay) for i in range(self.ntasks)), chunksize=1)
        handled = 0
        done = False
        while not self.term:
            if self.usr1 != handled:
                handled = self.usr1
                self.check(handled)
            if done:
                time.sleep(0.01)
                continue
            try:
                self.take(it.next(timeout=0.02))
            except multiprocessing.TimeoutError:
                pass
            except StopIteration:
                done = True
                if len(self.results) != self.ntasks:
                    self.latch("%d results, want %d" % (len(self.results), self.ntasks))
                if self.latched:
                    say("DONE FAIL %s" % self.latched)
                else:
                    say("DONE results=%d" % len(self.results))
        pool.close()
        pool.join()
        say("EXIT 7 results=%d" % len(self.results))
        return 7

    def on_usr1(self, sig, frame):
        self.usr1 += 1

    def on_term(self, sig, frame):
        self.term = True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=240)
    ap.add_argument("--task-ms", type=int, default=20)
    a = ap.parse_args()
    sys.exit(Root(a.tasks, a.task_ms / 1000.0).run())


if __name__ == "__main__":
    main()
