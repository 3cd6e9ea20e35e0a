"""Child processes whose threads are named as QEMU names its vCPU threads ("CPU i/TCG"), and
what /proc says about a process's threads (their ids, allowed CPUs, names).

Why here: the affinity and drift tests check the real syscalls on real processes, judged from
/proc rather than from the code under test; they share the same child and the same readers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

from cna_agent.host.cpulist import parse_cpulist

CHILD = textwrap.dedent(
    """
    import json, mmap, os, sys, threading, time
    n, alloc_mib, spin, map_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
    tids, lock = {}, threading.Lock()
    def worker(i):
        tid = threading.get_native_id()
        with open(f"/proc/self/task/{tid}/comm", "w") as f:
            f.write(f"CPU {i}/TCG")  # what QEMU names its vCPU threads
        with lock:
            tids[i] = tid
        if spin and i == 0:
            while time.thread_time() < 0.4:  # CPU time, not wall time: the host may be busy
                pass
        while True:
            time.sleep(0.005)  # wakes often, so "last CPU" follows a new pin quickly
    for i in range(n):
        threading.Thread(target=worker, args=(i,), daemon=True).start()
    buf = bytearray(alloc_mib << 20)
    for off in range(0, len(buf), 4096):
        buf[off] = 1  # resident, not just reserved
    keep = None
    if map_path != "-":
        fd = os.open(map_path, os.O_RDONLY)
        keep = mmap.mmap(fd, 4096, prot=mmap.PROT_READ)
        keep[0]
    while len(tids) < n:
        time.sleep(0.01)
    print(json.dumps({"pid": os.getpid(), "tids": [tids[i] for i in range(n)]}), flush=True)
    sys.stdin.read()
    """
)


class Child:
    """A Python child with ``threads`` workers named "CPU i/TCG" (optionally resident memory, worker 0
    burning CPU, a file mapped); it prints its pid and the workers' tids, and exits on close()."""

    def __init__(self, threads: int = 4, alloc_mib: int = 0, spin: bool = False, map_path: str = "-") -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(threads), str(alloc_mib), "1" if spin else "0", map_path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        info = json.loads(self.proc.stdout.readline())
        self.pid: int = info["pid"]
        #: workers[i] is the thread named "CPU i/TCG".
        self.workers: list[int] = info["tids"]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def proc_tids(pid: int) -> tuple[int, ...]:
    return tuple(sorted(int(n) for n in os.listdir(f"/proc/{pid}/task")))


def proc_allowed(pid: int, tid: int) -> tuple[int, ...]:
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return parse_cpulist(line.split(":", 1)[1])
    raise AssertionError("no Cpus_allowed_list")


def proc_comm(pid: int, tid: int) -> str:
    return Path(f"/proc/{pid}/task/{tid}/comm").read_text().rstrip("\n")


def proc_argvs() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, argv) of every live process, read from /proc (zombies and processes that exit
    while being read are skipped): the one scanner the tests use to find QEMU and qemu-img."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and argv and argv[0]:
            yield int(pid), argv


def qemu_img_converting(root: Path) -> list[int]:
    """Pids of live ``qemu-img convert`` processes with an argument under ``root`` (a
    datastore): the cancel and kill tests stop or find the real copier."""
    return [pid for pid, argv in proc_argvs()
            if os.path.basename(argv[0]) == b"qemu-img" and argv[1:2] == [b"convert"]
            and any(a.startswith(str(root).encode()) for a in argv)]
