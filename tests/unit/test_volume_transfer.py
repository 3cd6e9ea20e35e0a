"""Volume streaming for cold migration (storage/transfer.py) on real files: chunking that skips
holes and zero blocks, the content digest, the receiver's temp-name-then-link rule, the
destination's shared/copy/conflict/space decisions, and flattening a backing chain with the real
qemu-img. No daemons: the "two hosts" are two datastore roots under tmp_path.
"""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest

from cna_agent.compute.migration_cold import copy_candidates, deletable_after_move
from cna_agent.compute.spec import DiskSpec, VmSpec
from cna_agent.contracts import FileIdentity, TransferChunk
from cna_agent.errors import Aborted, AlreadyExists, FailedPrecondition, InvalidArgument
from cna_agent.storage import paths
from cna_agent.storage.executor import StorageExecutor
from cna_agent.storage.runner import SubprocessRunner
from cna_agent.storage.transfer import BLOCK, VolumeTransfers, data_blocks, identify, same_file, sparse_digest

MiB = 1 << 20


def _transfers(roots: dict[str, str]) -> VolumeTransfers:
    return VolumeTransfers(roots, SubprocessRunner(), StorageExecutor(2, 60), timeout=60)


def _files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _sparse_file(path, size: int, writes: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes.items():
            f.seek(off)
            f.write(data)


@pytest.fixture()
def hosts(tmp_path):
    """Host A's and host B's datastore "local" (different roots) and a "shared" one both see."""
    for d in ("a", "b", "shared"):
        (tmp_path / d).mkdir()
    a = _transfers({"local": str(tmp_path / "a"), "shared": str(tmp_path / "shared")})
    b = _transfers({"local": str(tmp_path / "b"), "shared": str(tmp_path / "shared")})
    return a, b, tmp_path


async def _move(a: VolumeTransfers, b: VolumeTransfers, src: str, dst: str) -> tuple[int, list[TransferChunk]]:
    stream = a.send(src)
    seen: list[TransferChunk] = []

    async def relay():
        async for c in stream:
            seen.append(c)
            yield c

    written = await b.receive(dst, stream.size, relay())
    return written, seen


def test_a_sparse_volume_crosses_as_its_data_only_and_arrives_identical_and_sparse(hosts) -> None:
    a, b, tmp = hosts
    src = str(tmp / "a" / "vm1" / "data.raw")
    os.makedirs(os.path.dirname(src))
    size = 64 * MiB + 1000  # the last block is short
    _sparse_file(src, size, {0: b"boot" * 128, 10 * MiB - 3: b"straddles two blocks", size - 10: b"tail-bytes",
                             30 * MiB: bytes(2 * MiB)})  # 2 MiB of written zeros: allocated, never sent
    dst = str(tmp / "b" / "vm1" / "data.raw")
    written, chunks = asyncio.run(_move(a, b, src, dst))

    data_chunks = [c for c in chunks if c.data]
    assert [c.offset for c in data_chunks] == [0, 9 * MiB, 10 * MiB, 64 * MiB]  # holes and zero blocks skipped
    assert chunks[-1].sha256 and not chunks[-1].data and chunks[-1].offset == size
    assert written == sum(len(c.data) for c in data_chunks) == 3 * BLOCK + 1000
    assert open(src, "rb").read() == open(dst, "rb").read()
    st = os.stat(dst)
    assert st.st_size == size and st.st_blocks * 512 < 8 * MiB  # still sparse (about 4 MiB allocated)
    assert chunks[-1].sha256 == sparse_digest(dst) == sparse_digest(src)
    assert _files(tmp / "b") == ["vm1/data.raw"]  # no temporary file left next to it
    assert oct(st.st_mode & 0o777) == "0o600"


def test_the_digest_is_of_the_content_not_the_layout(tmp_path) -> None:
    thick, sparse = tmp_path / "thick", tmp_path / "sparse"
    thick.write_bytes(bytes(3 * MiB) + b"x" + bytes(MiB))
    _sparse_file(sparse, 4 * MiB + 1, {3 * MiB: b"x"})
    assert sparse_digest(str(thick)) == sparse_digest(str(sparse))
    _sparse_file(sparse, 4 * MiB + 1, {3 * MiB: b"y"})
    assert sparse_digest(str(thick)) != sparse_digest(str(sparse))
    _sparse_file(sparse, 4 * MiB + 2, {3 * MiB: b"x"})  # same data, other size
    assert sparse_digest(str(thick)) != sparse_digest(str(sparse))
    fd = os.open(sparse, os.O_RDONLY)
    try:
        assert list(data_blocks(fd, 4 * MiB + 2)) == [3 * MiB]  # only the block holding data, aligned
    finally:
        os.close(fd)


async def _chunks(*items: TransferChunk, hang: asyncio.Event | None = None):
    for c in items:
        yield c
    if hang is not None:
        await hang.wait()


def test_a_bad_stream_leaves_nothing_on_the_destination(hosts) -> None:
    _, b, tmp = hosts
    dst = str(tmp / "b" / "vm" / "d.raw")
    good = b"z" * 100
    cases = [
        (_chunks(TransferChunk(0, good), TransferChunk(2 * MiB, b"", "0" * 64)), Aborted, "does not match"),
        (_chunks(TransferChunk(0, good)), Aborted, "ended before its checksum"),
        (_chunks(TransferChunk(MiB, good), TransferChunk(0, good)), InvalidArgument, "offset"),
        (_chunks(TransferChunk(5, good)), InvalidArgument, "offset"),
        (_chunks(TransferChunk(MiB, b"q" * (MiB + 1))), InvalidArgument, "data"),
    ]
    for stream, err, words in cases:
        with pytest.raises(err) as exc:
            asyncio.run(b.receive(dst, 2 * MiB, stream))
        assert words in str(exc.value)
        assert [f for f in _files(tmp / "b") if not f.endswith("/")] == [], exc.value
    # a cancel in the middle (the source's operation was cancelled): the temp file goes too
    async def cancelled() -> None:
        task = asyncio.ensure_future(b.receive(dst, 2 * MiB, _chunks(TransferChunk(0, good), hang=asyncio.Event())))
        await asyncio.sleep(0.3)
        assert any(paths.TEMP_MARK in f for f in _files(tmp / "b"))  # it was being written
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    assert _files(tmp / "b") == []
    # a file that appeared at the name is never replaced
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    open(dst, "wb").write(b"someone else's")
    with pytest.raises(AlreadyExists):
        asyncio.run(b.receive(dst, 2 * MiB, _chunks(TransferChunk(0, good))))
    assert open(dst, "rb").read() == b"someone else's" and _files(tmp / "b") == ["vm/d.raw"]


def test_the_destination_tells_shared_from_local_and_refuses_conflicts_space_and_escapes(hosts) -> None:
    a, b, tmp = hosts
    for root in ("a", "shared"):
        os.makedirs(tmp / root / "vm", exist_ok=True)
        _sparse_file(tmp / root / "vm" / "d.raw", 8 * MiB, {0: b"disk " + root.encode()})
    local = identify(str(tmp / "a" / "vm" / "d.raw"))
    shared = identify(str(tmp / "shared" / "vm" / "d.raw"))
    plans = asyncio.run(b.plan_receive([("local/vm/d.raw", local, "spec.disks[0].volume"),
                                        ("shared/vm/d.raw", shared, "spec.disks[1].volume")]))
    assert [(p.copy, p.path) for p in plans] == [(True, str(tmp / "b" / "vm" / "d.raw")),
                                                 (False, str(tmp / "shared" / "vm" / "d.raw"))]
    assert same_file(str(tmp / "shared" / "vm" / "d.raw"), shared)
    # a copy of the file (same bytes, another inode) is not "the same file"
    os.makedirs(tmp / "b" / "vm")
    (tmp / "b" / "vm" / "d.raw").write_bytes((tmp / "a" / "vm" / "d.raw").read_bytes())
    with pytest.raises(AlreadyExists) as exc:
        asyncio.run(b.plan_receive([("local/vm/d.raw", local, "spec.disks[0].volume")]))
    assert "spec.disks[0].volume" in str(exc.value) and "never overwritten" in str(exc.value)
    os.unlink(tmp / "b" / "vm" / "d.raw")
    # no room: the sum per datastore is checked before anything is written
    free = os.statvfs(tmp / "b").f_bavail * os.statvfs(tmp / "b").f_frsize
    big = FileIdentity(size=free, allocated=free // 2 + 1, inode=1, mtime_ns=1, head_sha256="0" * 64)
    with pytest.raises(FailedPrecondition) as exc:
        asyncio.run(b.plan_receive([("local/vm/x.raw", big, "spec.disks[0].volume"), ("local/vm/y.raw", big, "spec.disks[1].volume")]))
    assert "'local'" in str(exc.value) and "MiB free" in str(exc.value)
    # caller paths stay inside the datastores; unknown datastores and foreign host files are refused
    for volume, ident, err, words in (("local/../a/vm/d.raw", local, InvalidArgument, "spec.disks[0].volume"),
                                      ("nowhere/vm/d.raw", local, InvalidArgument, "nowhere"),
                                      (str(tmp / "a" / "vm" / "d.raw"), shared, FailedPrecondition,
                                       "only datastore volumes are copied")):
        with pytest.raises(err) as exc:
            asyncio.run(b.plan_receive([(volume, ident, "spec.disks[0].volume")]))
        assert words in str(exc.value)
    # a host file outside the datastores that this host sees as the same file is used in place
    assert asyncio.run(b.plan_receive([(str(tmp / "a" / "vm" / "d.raw"), local, "spec.disks[0].volume")]))[0].copy is False
    os.symlink(tmp / "a", tmp / "b" / "escape")
    with pytest.raises(InvalidArgument):
        asyncio.run(b.plan_receive([("local/escape/vm/d.raw", local, "spec.disks[0].volume")]))
    assert sorted(os.listdir(tmp / "b")) == ["escape", "vm"] and not os.listdir(tmp / "b" / "vm")


def _qemu(*argv: str) -> None:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_a_linked_clone_is_flattened_into_one_standalone_volume(hosts) -> None:
    a, b, tmp = hosts
    base, overlay = str(tmp / "a" / "base.qcow2"), str(tmp / "a" / "clone.qcow2")
    _qemu("qemu-img", "create", "-q", "-f", "qcow2", base, "16M")
    _qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", base)
    _qemu("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay)
    _qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0xa5 4M 1M", overlay)
    ident = identify(overlay)
    assert ident.has_backing and ident.allocated > os.stat(overlay).st_blocks * 512
    flat = asyncio.run(a.flatten(overlay))
    try:
        assert paths.TEMP_MARK in flat and os.path.dirname(flat) == os.path.dirname(overlay)
        assert not identify(flat).has_backing
        dst = str(tmp / "b" / "clone.qcow2")
        asyncio.run(_move(a, b, flat, dst))
    finally:
        asyncio.run(a.remove(flat))
    assert not os.path.exists(flat)
    _qemu("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", overlay, dst)  # same guest-visible content
    assert not identify(dst).has_backing


def test_which_disks_move_and_which_source_copies_are_deleted() -> None:
    spec = VmSpec(name="v", disks=[DiskSpec(volume="local/v/root.qcow2"), DiskSpec(volume="local/iso/x.iso", device="cdrom"),
                                   DiskSpec(volume="/images/k.raw"), DiskSpec(volume="local/v/shared.raw", shareable=True),
                                   DiskSpec(volume="")])
    assert copy_candidates(spec) == [0, 1, 2, 3]
    assert [deletable_after_move(spec, i) for i in range(4)] == [True, False, False, False]


# -- the destination's checks before a byte is written (no libvirt: the parts that need none) ----


def _ident(size: int = 2 * MiB) -> FileIdentity:
    return FileIdentity(size=size, allocated=size, inode=7, mtime_ns=1, head_sha256="a" * 64)


def test_the_prepare_request_is_refused_naming_the_field_before_anything_happens() -> None:
    from types import SimpleNamespace

    from cna_agent.api import pb
    from cna_agent.api.migration import MigrationServicer

    m, vm = pb.migration_pb2, pb.vm_pb2
    calls: list[object] = []
    cold = SimpleNamespace(prepare=lambda *a: calls.append(a), ttl_s=600)
    servicer = MigrationServicer(None, cold)  # type: ignore[arg-type]
    spec = vm.VmSpec(name="c", uuid="0b5c2f8e-3d41-4a9b-8c7e-6f5a4b3c2d97", vcpus=1, memory_mib=64,
                     disks=[vm.DiskSpec(volume="local/c/d.raw")])
    good = dict(index=0, size_bytes=MiB, allocated_bytes=MiB, inode=5, mtime_ns=1, head_sha256="0" * 64)
    for change, field in (({"index": 1}, "disks[0].index"), ({"inode": (1 << 64) - 1}, "disks[0].inode"),
                          ({"mtime_ns": -1}, "disks[0].mtime_ns"), ({"size_bytes": 1 << 63}, "disks[0].size_bytes"),
                          ({"head_sha256": "../../etc"}, "disks[0].head_sha256")):
        req = m.PrepareColdIncomingRequest(migration_id="mig-1", spec=spec, disks=[m.ColdDiskIdentity(**{**good, **change})])
        with pytest.raises(InvalidArgument) as exc:
            asyncio.run(servicer.PrepareColdIncoming(req, None))
        assert exc.value.field == field
    for req, field in ((m.PrepareColdIncomingRequest(migration_id="", spec=spec), "migration_id"),
                       (m.PrepareColdIncomingRequest(migration_id="m", spec=spec, source_host_uuid="a/b"), "source_host_uuid"),
                       (m.PrepareColdIncomingRequest(migration_id="m"), "spec")):
        with pytest.raises(InvalidArgument) as exc:
            asyncio.run(servicer.PrepareColdIncoming(req, None))
        assert exc.value.field == field
    assert calls == []


def test_a_volume_stream_must_be_one_the_destination_planned_and_an_abort_during_it_keeps_nothing(hosts) -> None:
    from types import SimpleNamespace

    from cna_agent.compute.migration_cold_incoming import ColdIncoming, ColdPending
    from cna_agent.contracts import ReceivePlan

    a, b, tmp = hosts
    cold = ColdIncoming(SimpleNamespace(hv=None), None, None, b)  # type: ignore[arg-type]
    dst = str(tmp / "b" / "v" / "d.raw")
    spec = VmSpec(name="v", uuid="u", disks=[DiskSpec(volume="local/v/d.raw"), DiskSpec(volume="shared/v/s.raw")])
    cold._pending["m1"] = ColdPending("m1", spec, {0: ReceivePlan(dst, True), 1: ReceivePlan("/x", False)}, "",
                                      identities={0: _ident(), 1: _ident()})
    for index, size, field in ((1, 2 * MiB, "disk_index"), (5, 2 * MiB, "disk_index"), (0, 3 * MiB, "size_bytes")):
        with pytest.raises(InvalidArgument) as exc:
            asyncio.run(cold.receive("m1", index, size, _chunks()))
        assert exc.value.field == field
    assert not os.path.exists(tmp / "b" / "v")  # refused before a directory was made

    async def aborted_mid_stream() -> None:
        src = str(tmp / "a" / "d.raw")
        _sparse_file(src, 2 * MiB, {0: b"data"})
        stream = a.send(src)

        async def relay():
            async for c in stream:
                if c.sha256:
                    del cold._pending["m1"]  # the abort came while the last chunk was on its way
                yield c

        with pytest.raises(Exception, match="aborted during the copy"):
            await cold.receive("m1", 0, 2 * MiB, relay())

    asyncio.run(aborted_mid_stream())
    assert _files(tmp / "b") == []
