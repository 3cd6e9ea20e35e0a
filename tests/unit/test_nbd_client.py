"""The NBD client (cna_agent/nbd_client.py) against qemu-nbd, the server QEMU's own NBD code
is: allocation and dirty-bitmap extents as qemu-img wrote them, reads of data and holes, writes
and zero writes that qemu-io reads back."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cna_agent import nbd_client as nbd

MiB = 1 << 20
pytestmark = pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="needs qemu-nbd")


def _run(*argv: str) -> str:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, (argv, p.stderr)
    return p.stdout


def _serve(image: Path, sock: Path, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", str(sock), "-x", "vda", *extra, str(image)])
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "qemu-nbd did not start"
        time.sleep(0.02)
    return proc


def test_extents_reads_and_writes_match_what_qemu_sees(tmp_path) -> None:
    img = tmp_path / "src.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M")
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 1M 2M", "-c", "write -P 0x22 40M 64k", str(img))
    _run("qemu-img", "bitmap", "--add", str(img), "b0")
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 8M 128k", "-c", "write -z 1M 64k", str(img))
    sock = tmp_path / "s.sock"
    proc = _serve(img, sock, "-r", "-B", "b0")
    try:
        with nbd.NbdClient(str(sock), "vda", contexts=(nbd.BASE_ALLOCATION, "qemu:dirty-bitmap:b0")) as c:
            assert c.size == 64 * MiB
            data = [(e.offset, e.length) for e in c.extents(nbd.BASE_ALLOCATION) if not e.flags & nbd.STATE_ZERO]
            assert (1 * MiB + 64 * 1024, 2 * MiB - 64 * 1024) in data and (40 * MiB, 64 * 1024) in data, data
            dirty = [(e.offset, e.length) for e in c.extents("qemu:dirty-bitmap:b0") if e.flags & nbd.STATE_DIRTY]
            assert dirty == [(1 * MiB, 64 * 1024), (8 * MiB, 128 * 1024)], dirty
            assert sum(e.length for e in c.extents(nbd.BASE_ALLOCATION)) == 64 * MiB  # contiguous, to the end
            assert c.read(2 * MiB, 4096) == b"\x11" * 4096
            assert c.read(1 * MiB, 4096) == b"\0" * 4096  # the zeroed range
            assert c.read(60 * MiB, 8192) == b"\0" * 8192  # a hole
            with pytest.raises(nbd.NbdError, match="meta context"):
                list(c.extents("qemu:dirty-bitmap:nope"))
    finally:
        proc.wait(timeout=10)

    dst = tmp_path / "dst.qcow2"
    _run("qemu-img", "create", "-q", "-f", "qcow2", str(dst), "64M")
    sock2 = tmp_path / "d.sock"
    proc = _serve(dst, sock2)
    try:
        with nbd.NbdClient(str(sock2), "vda") as c:
            c.write(8 * MiB, b"\x44" * (5 * MiB))  # larger than one chunk
            c.write_zeroes(9 * MiB, 4096)
            c.flush()
    finally:
        proc.wait(timeout=10)
    out = _run("qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x44 8M 1M", "-c", "read -P 0 9M 4k",
               "-c", "read -P 0x44 9220k 3M", str(dst))
    assert "Pattern verification failed" not in out, out
