"""Copying a backup's NBD export into a qcow2 file: the client half of a pull backup.

A full backup copies the extents that hold data (``base:allocation``: holes and zero ranges
are skipped, so the file is as sparse as the disk); an incremental one copies only the extents
the export's dirty bitmap marks, into a qcow2 overlay whose backing file is the previous
backup, so the chain full <- inc1 <- inc2 reads as the disk at the newest point (qemu-img
follows it; ``restore_chain`` flattens it). A dirty range that now reads as zeros is written as
zeros (the overlay must hide what its backing had there).

The destination is written through ``qemu-nbd`` (QEMU's own qcow2 writer, so the chain is a
plain qcow2 chain any qemu-img reads) on a unix socket in a private temporary directory. Every
external command is an argument list with a timeout. Used by ``cna-ctl vm backup`` and
``benchmarks/backup.py``.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

from cna_agent import nbd_client as nbd

#: Seconds qemu-nbd gets to come up, and to write its last data out at the end.
QEMU_NBD_START_S = 15.0
QEMU_NBD_EXIT_S = 120.0
COMMAND_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class CopyStats:
    bytes_copied: int
    extents: int
    elapsed_s: float


def _run(argv: list[str], timeout: float = COMMAND_TIMEOUT_S) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{argv[0]} {argv[1]} failed: {p.stderr.strip()[-500:]}")
    return p.stdout


def create_target(path: str, size: int, backing: str = "") -> None:
    """A new qcow2 of ``size`` bytes, on ``backing`` (a file name beside it) when given."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        argv += ["-b", backing, "-F", "qcow2"]
    _run([*argv, path, str(size)], timeout=120)


class _Writer:
    """qemu-nbd serving ``image`` read-write to us alone, and our client of it."""

    def __init__(self, image: str) -> None:
        self._dir = tempfile.mkdtemp(prefix="cna-bk-")
        sock = os.path.join(self._dir, "w.sock")
        self._proc = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", sock, "-x", "w", "--cache=writeback", image],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + QEMU_NBD_START_S
        while not os.path.exists(sock):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self._stop()
                raise RuntimeError(f"qemu-nbd did not serve {image}")
            time.sleep(0.02)
        self.client = nbd.NbdClient(sock, "w")

    def finish(self) -> None:
        self.client.flush()
        self.client.close()
        self._proc.wait(timeout=QEMU_NBD_EXIT_S)  # it exits when its only client leaves
        if self._proc.returncode != 0:
            raise RuntimeError(f"qemu-nbd failed: {self._proc.stderr.read().decode(errors='replace')[-500:]}")
        self._stop()

    def _stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=30)
        if self._proc.stderr is not None:
            self._proc.stderr.close()
        for name in os.listdir(self._dir):
            os.unlink(os.path.join(self._dir, name))
        os.rmdir(self._dir)

    def abort(self) -> None:
        try:
            self.client.close()
        finally:
            self._stop()


def copy_export(socket_path: str, export: str, target: str, *, dirty_bitmap: str = "",
                progress: Callable[[int, int], None] | None = None) -> CopyStats:
    """Copy export ``export`` (on ``socket_path``) into the qcow2 ``target`` (made beforehand,
    see create_target): everything that holds data, or with ``dirty_bitmap`` only what it
    marks. ``progress(done, total)`` in bytes of the extents to copy."""
    started = time.monotonic()
    context = f"qemu:dirty-bitmap:{dirty_bitmap}" if dirty_bitmap else nbd.BASE_ALLOCATION
    with nbd.NbdClient(socket_path, export, contexts=(context,)) as src:
        if dirty_bitmap:
            todo = [(e.offset, e.length) for e in src.extents(context) if e.flags & nbd.STATE_DIRTY]
        else:
            todo = [(e.offset, e.length) for e in src.extents(context) if not e.flags & nbd.STATE_ZERO]
        total = sum(n for _, n in todo)
        writer = _Writer(target)
        done = copied = 0
        try:
            for offset, length in todo:
                end = offset + length
                while offset < end:
                    n = min(nbd.MAX_IO, end - offset)
                    data = src.read(offset, n)
                    if data == bytes(n):
                        if dirty_bitmap:  # the overlay must read zeros here, not its backing's data
                            writer.client.write_zeroes(offset, n)
                    else:
                        writer.client.write(offset, data)
                        copied += n
                    offset += n
                    done += n
                    if progress is not None:
                        progress(done, total)
            writer.finish()
        except BaseException:
            writer.abort()
            raise
    return CopyStats(copied, len(todo), time.monotonic() - started)


def restore_chain(top: str, output: str) -> None:
    """One standalone qcow2 at ``output`` with what the chain ending at ``top`` reads."""
    _run(["qemu-img", "convert", "-q", "-O", "qcow2", top, output])
