#!/usr/bin/env python3
"""Python test workload of phaul's end-to-end tests.

A large bytearray whose 64 KiB chunks carry patterns with known CRCs (a
worker thread re-verifies a chunk before rewriting it), a list with a
pattern, a threading.Thread doing work, a signal.signal(SIGUSR1) handler
and time.monotonic checks.

It speaks the fixture protocol of e2e/testdata/fixture.h: "REGION buf",
"READY <pid>", one "CHECK <seq> OK|FAIL ..." line per SIGUSR1, and
"EXIT <status>" then exit on SIGTERM (--exit-code, default 7).
"""

import argparse
import ctypes
import os
import random
import signal
import sys
import threading
import time
import zlib

CHUNK = 64 << 10


def say(line):
    """Print one protocol line with a single write."""
    os.write(1, (line.replace("\n", " ") + "\n").encode())


class Workload:
    def __init__(self, mib):
        self.lock = threading.Lock()
        self.buf = bytearray(mib << 20)
        n = len(self.buf) // CHUNK
        self.gen = [0] * n
        self.crcs = [0] * n
        for i in range(n):
            self.fill(i)
        self.items = [i * i % 1000003 for i in range(200000)]
        self.latched = None
        self.work = 0
        self.progress = 0
        self.last = {}
        self.usr1 = 0
        self.term = False
        self.start_mono = time.monotonic()
        self.last_mono = self.start_mono

    def latch(self, msg):
        if self.latched is None:
            self.latched = msg

    def fill(self, i):
        data = random.Random(i << 32 | self.gen[i]).randbytes(CHUNK)
        self.buf[i * CHUNK:(i + 1) * CHUNK] = data
        self.crcs[i] = zlib.crc32(data)

    def verify(self, i):
        got = zlib.crc32(memoryview(self.buf)[i * CHUNK:(i + 1) * CHUNK])
        if got != self.crcs[i]:
            return "buf: chunk %d (offset %d) crc %08x, want %08x" % (i, i * CHUNK, got, self.crcs[i])
        return None

    def worker(self):
        step = 0
        while True:
            i = step * 7919 % len(self.gen)
            with self.lock:
                err = self.verify(i)
                if err:
                    self.latch(err + " (worker)")
                self.gen[i] += 1
                self.fill(i)
            k = step * 31 % len(self.items)
            if self.items[k] != k * k % 1000003:
                self.latch("items: [%d] is %d" % (k, self.items[k]))
            self.work += 1
            step += 1
            time.sleep(0.002)

    def check(self, seq):
        fails = []
        if self.latched:
            fails.append(self.latched)
        if seq > 1 and self.progress <= self.last.get("progress", -1):
            fails.append("progress did not advance: %d" % self.progress)
        with self.lock:
            for i in range(len(self.gen)):
                err = self.verify(i)
                if err:
                    fails.append(err)
                    break
        for k in range(0, len(self.items), 97):
            if self.items[k] != k * k % 1000003:
                fails.append("items: [%d] is %d" % (k, self.items[k]))
                break
        now = time.monotonic()
        if now < self.last_mono:
            fails.append("time.monotonic went backwards: %f < %f" % (now, self.last_mono))
        self.last_mono = now
        if abs(time.time() - time.clock_gettime(time.CLOCK_REALTIME)) > 3:
            fails.append("time.time() disagrees with CLOCK_REALTIME")
        if not self.thread.is_alive():
            fails.append("worker thread died")
        if self.thread.native_id != self.worker_tid:
            fails.append("worker native id %s, want %s" % (self.thread.native_id, self.worker_tid))
        if threading.active_count() != 2:
            fails.append("threading.active_count()=%d, want 2" % threading.active_count())
        if signal.getsignal(signal.SIGUSR1) != self.on_usr1:
            fails.append("SIGUSR1 handler changed: %r" % (signal.getsignal(signal.SIGUSR1),))
        if seq > 1 and self.work < self.last.get("work", 0):
            fails.append("worker counter went backwards")
        self.last = {"progress": self.progress, "work": self.work}
        if fails:
            say("CHECK %d FAIL %s" % (seq, "; ".join(fails)))
        else:
            say("CHECK %d OK progress=%d work=%d usr1=%d" % (seq, self.progress, self.work, self.usr1))

    def on_usr1(self, signum, frame):
        self.usr1 += 1

    def on_term(self, signum, frame):
        self.term = True

    def run(self, exit_code):
        signal.signal(signal.SIGUSR1, self.on_usr1)
        signal.signal(signal.SIGTERM, self.on_term)
        self.thread = threading.Thread(target=self.worker, name="worker", daemon=True)
        self.thread.start()
        while self.thread.native_id is None:
            time.sleep(0.001)
        self.worker_tid = self.thread.native_id
        addr = ctypes.addressof((ctypes.c_char * len(self.buf)).from_buffer(self.buf))
        say("REGION buf %#x %d" % (addr, len(self.buf)))
        say("READY %d" % os.getpid())
        handled = 0
        seq = 0
        while True:
            if self.term:
                say("EXIT %d progress=%d" % (exit_code, self.progress))
                sys.stdout.flush()
                os._exit(exit_code)
            if self.usr1 != handled:
                handled = self.usr1
                seq += 1
                self.check(seq)
            self.progress += 1
            time.sleep(0.005)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--exit-code", type=int, default=7)
    args = ap.parse_args()
    Workload(args.mib).run(args.exit_code)


if __name__ == "__main__":
    main()
