"""Volume files between hosts for a cold migration (contracts.VolumeTransfer): the source reads a
volume as a stream of chunks, the destination writes it under a temporary name and makes it
visible only once the stream's digest matched what is on its disk.

Decisions, and why:

* **Aligned blocks, zero blocks skipped.** The file is cut into BLOCK-sized pieces at fixed
  offsets (k * BLOCK). Holes are found with SEEK_DATA/SEEK_HOLE and not even read; a block that
  reads as all zeros is not sent either. The destination pre-sizes its file with ftruncate and
  writes only what arrives, so a sparse volume stays sparse (and a thick one with zeroed areas
  becomes sparse: the guest reads zeros either way).
* **A digest of the content, not of the transfer.** ``sparse_digest`` is SHA-256 over the file
  size and each non-zero block with its offset. It depends only on what a reader of the file
  sees, not on where either file system keeps holes, so the source computes it while it reads and
  the destination recomputes it by *reading back its own temporary file* after fsync: a match
  proves the bytes on the destination's disk are the source's, not merely that the stream
  arrived.
* **Nothing partial is ever visible**: the temporary name carries paths.TEMP_MARK (hidden from
  listings and swept at start-up by VolumeManager.sweep_temp_files), the final name appears by
  link(2) (which refuses to replace a file that appeared meanwhile) after the digest matched,
  and any failure or cancel unlinks the temporary file.
* **qcow2 files travel as files** (header, tables and all), so format, cluster size and
  internal layout stay the source's. **A backing chain is flattened** on the source first
  (``qemu-img convert`` into a temporary standalone qcow2 next to the overlay, removed after the
  stream): the destination gets one self-contained volume and never depends on a template it
  may not have. The price is the template's data crossing the wire once per VM, which nova's
  cold migration also pays when the destination's image cache lacks the base.
* **Shared or not is decided by the destination from the file itself** (``same_file``): the
  same inode number, size, mtime and a hash of the first HEAD bytes. A shared file system shows
  the same file to every host with these facts equal; a copy or an unrelated file at the same
  name differs at least in inode or mtime. A different file at the target name is refused,
  never overwritten.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from typing import AsyncIterable, AsyncIterator, Iterator, Mapping

from cna_agent.contracts import FileIdentity, ReceivePlan, TransferChunk
from cna_agent.errors import AlreadyExists, Aborted, FailedPrecondition, InvalidArgument
from cna_agent.qemu_access import make_dirs
from cna_agent.storage import paths, qcow2hdr, qemuimg
from cna_agent.storage.executor import StorageExecutor
from cna_agent.storage.runner import CommandRunner

#: Chunk, write and digest unit: 1 MiB keeps a gRPC message well under the 4 MiB default limit
#: and the per-chunk overhead (a thread hop, a message) small.
BLOCK = 1 << 20
#: Bytes hashed for the identity check (a qcow2 header and its first tables, a raw disk's
#: partition table and boot area).
HEAD = 64 << 10
#: Space the destination keeps free beyond the copies (metadata, rounding).
SPACE_MARGIN = 64 << 20
_ZERO = bytes(BLOCK)
VOLUME_MODE = 0o600


# -- pure file functions (run in the storage executor) -------------------------------------------


def data_blocks(fd: int, size: int, block: int = BLOCK) -> Iterator[int]:
    """Offsets (multiples of ``block``) of the blocks that hold data, in order; holes are skipped
    via SEEK_DATA/SEEK_HOLE, or every block is listed where the file system has no such call."""
    nxt = 0  # the first block not listed yet
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                start = pos
                end = size
            else:
                raise
        else:
            end = os.lseek(fd, start, os.SEEK_HOLE)
        first = start // block * block
        for off in range(max(first, nxt), min(end, size), block):
            yield off
            nxt = off + block
        pos = max(end, pos + 1)


def nonzero_chunks(fd: int, size: int, block: int = BLOCK) -> Iterator[tuple[int, bytes]]:
    """(offset, data) of every block that holds anything but zeros."""
    for off in data_blocks(fd, size, block):
        data = os.pread(fd, min(block, size - off), off)
        if data != (_ZERO if len(data) == BLOCK else bytes(len(data))):
            yield off, data


class SparseDigest:
    """SHA-256 over the size and the non-zero blocks with their offsets (module docstring)."""

    def __init__(self, size: int) -> None:
        self._h = hashlib.sha256(b"cna-sparse-v1\0" + size.to_bytes(8, "big"))

    def update(self, offset: int, data: bytes) -> None:
        self._h.update(offset.to_bytes(8, "big") + len(data).to_bytes(4, "big"))
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def sparse_digest(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        d = SparseDigest(size)
        for off, data in nonzero_chunks(fd, size):
            d.update(off, data)
        return d.hexdigest()
    finally:
        os.close(fd)


def identify(path: str) -> FileIdentity:
    st = os.stat(path)
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(HEAD)).hexdigest()
    chain = qcow2hdr.backing_chain(path)
    allocated = st.st_blocks * 512 + sum(os.stat(p).st_blocks * 512 for p in chain if os.path.exists(p))
    return FileIdentity(size=st.st_size, allocated=allocated, inode=st.st_ino, mtime_ns=st.st_mtime_ns,
                        head_sha256=head, has_backing=bool(chain))


def same_file(path: str, ident: FileIdentity) -> bool:
    """Whether ``path`` here is the very file the source described (a shared datastore)."""
    try:
        here = identify(path)
    except OSError:
        return False
    return (here.inode, here.size, here.mtime_ns, here.head_sha256) == (ident.inode, ident.size, ident.mtime_ns,
                                                                         ident.head_sha256)


def temp_name(path: str) -> str:
    d, base = os.path.split(path)
    return os.path.join(d, f".{base}{paths.TEMP_MARK}{secrets.token_hex(4)}")


class Receiver:
    """One incoming file: a pre-sized temporary file next to ``path``, written chunk by chunk
    (aligned, in order, inside the announced size), linked to ``path`` by commit() only when
    the digest read back from disk is the sender's."""

    def __init__(self, path: str, size: int) -> None:
        if size < 0 or size > 64 << 40:
            raise InvalidArgument("size_bytes", f"{size} is not a volume size (0..64 TiB)")
        self.path, self.size = path, size
        self.tmp = temp_name(path)
        self.written = 0
        self._next = 0
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, VOLUME_MODE)
        try:
            os.ftruncate(self._fd, size)
        except BaseException:
            self.discard()
            raise

    def write(self, offset: int, data: bytes) -> None:
        if offset % BLOCK or offset < self._next:
            raise InvalidArgument("offset", f"{offset}: chunks come in order at multiples of {BLOCK} bytes")
        if len(data) > BLOCK or offset + len(data) > self.size:
            raise InvalidArgument("data", f"{len(data)} bytes at {offset} overrun the block or the file's {self.size} bytes")
        os.pwrite(self._fd, data, offset)
        self._next = offset + max(len(data), 1)
        self.written += len(data)

    def commit(self, sha256: str) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        got = sparse_digest(self.tmp)  # read back: what is on this disk, not what was sent
        if got != sha256:
            self.discard()
            raise Aborted(f"the copy of {os.path.basename(self.path)} does not match the source (sha256 {got[:16]}... "
                          f"against {sha256[:16]}...); nothing was kept")
        try:
            os.link(self.tmp, self.path)
        except FileExistsError:
            raise AlreadyExists(f"{self.path} appeared on the destination during the copy", field="volume") from None
        finally:
            paths.unlink_if_there(self.tmp)
        paths.fsync_path(os.path.dirname(self.path))

    def discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        paths.unlink_if_there(self.tmp)


# -- the async service (contracts.VolumeTransfer) -----------------------------------------------


class VolumeStream:
    """One volume read for sending: ``async for chunk in stream``; ``sent`` is how far into the
    file the reader got (for progress), ``size`` the file's size."""

    def __init__(self, path: str, pool: StorageExecutor) -> None:
        self.path = path
        self.size = os.stat(path).st_size
        self.sent = 0
        self._pool = pool

    def __aiter__(self) -> AsyncIterator[TransferChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[TransferChunk]:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            blocks = nonzero_chunks(fd, self.size)
            digest = SparseDigest(self.size)
            while True:
                try:
                    item = await self._pool.run(lambda: next(blocks, None), timeout=120, what=f"reading {self.path}")
                except OSError as exc:
                    raise FailedPrecondition(f"reading {self.path} failed: {exc.strerror}", field="vm") from None
                if item is None:
                    break
                off, data = item
                digest.update(off, data)
                self.sent = off + len(data)
                yield TransferChunk(off, data)
            self.sent = self.size
            yield TransferChunk(self.size, b"", digest.hexdigest())
        finally:
            os.close(fd)


class VolumeTransfers:
    """contracts.VolumeTransfer over this host's directory datastores (``roots``: name -> root)."""

    def __init__(self, roots: Mapping[str, str], runner: CommandRunner, pool: StorageExecutor, *, timeout: float) -> None:
        self.roots = dict(roots)
        self.runner = runner
        self.pool = pool
        self.timeout = timeout

    async def identify(self, path: str) -> FileIdentity:
        return await self.pool.run(lambda: identify(path), timeout=60, what=f"identifying {path}")

    def send(self, path: str) -> VolumeStream:
        return VolumeStream(path, self.pool)

    async def flatten(self, path: str) -> str:
        tmp = temp_name(path)
        size = os.stat(path).st_size
        limit = max(self.timeout, 600 + size / (20 << 20))

        def run() -> None:
            try:
                qemuimg.convert(self.runner, path, "qcow2", tmp, "qcow2", timeout=limit, on_progress=lambda _p: None)
            except BaseException:
                paths.unlink_if_there(tmp)
                raise

        await self.pool.run(run, timeout=limit + 30, what=f"flattening {path}")
        return tmp

    def _root_of(self, path: str) -> tuple[str, str]:
        real = os.path.realpath(path)
        for name, root in self.roots.items():
            rroot = os.path.realpath(root)
            if paths.inside(rroot, real) and real != rroot:
                return name, rroot
        raise InvalidArgument("volume", f"{path} is not inside a directory datastore of this host")

    async def plan_receive(self, volumes: list[tuple[str, FileIdentity, str]]) -> list[ReceivePlan]:
        def plan() -> list[ReceivePlan]:
            out: list[ReceivePlan] = []
            needed: dict[str, int] = {}
            for volume, ident, field in volumes:
                if volume.startswith("/"):
                    # A host file outside the datastores (compute's image_dirs, confined by
                    # compute): usable only when it is this very file.
                    if not same_file(volume, ident):
                        raise FailedPrecondition(f"{field}: {volume} is a host file outside the datastores and this host "
                                                 "does not see the same file; only datastore volumes are copied", field=field)
                    out.append(ReceivePlan(volume, copy=False))
                    continue
                ref = paths.resolve(self.roots, volume, field)
                if same_file(ref.path, ident):
                    out.append(ReceivePlan(ref.path, copy=False))
                    continue
                if os.path.lexists(ref.path):
                    raise AlreadyExists(f"{field}: datastore {ref.datastore!r} on the destination already holds a different "
                                        f"file at {ref.relpath!r}; it is never overwritten", field=field)
                needed[ref.datastore] = needed.get(ref.datastore, 0) + ident.allocated
                out.append(ReceivePlan(ref.path, copy=True))
            for ds, need in needed.items():
                st = os.statvfs(self.roots[ds])
                free = st.f_bavail * st.f_frsize
                if need + SPACE_MARGIN > free:
                    raise FailedPrecondition(f"datastore {ds!r} on the destination has {free >> 20} MiB free; the VM's "
                                             f"volumes need {(need + SPACE_MARGIN) >> 20} MiB", field="spec.disks")
            return out

        return await self.pool.run(plan, timeout=60, what="planning the incoming volumes")

    async def receive(self, path: str, size: int, chunks: AsyncIterable[TransferChunk]) -> int:
        name, root = self._root_of(path)

        def open_target() -> Receiver:
            parent = os.path.dirname(path)
            make_dirs(parent, below=root)  # 0711 directories, as VolumeManager makes them
            if not paths.inside(root, os.path.realpath(parent)):
                raise InvalidArgument("volume", f"{path} resolves outside datastore {name!r}")
            if os.path.lexists(path):
                raise AlreadyExists(f"{path} already exists on the destination", field="volume")
            return Receiver(path, size)

        try:
            rx = await self.pool.run(open_target, timeout=60, what=f"creating {path}")
        except OSError as exc:
            raise FailedPrecondition(f"cannot create {path} on the destination: {exc.strerror}", field="volume") from None
        committed = False
        try:
            async for chunk in chunks:
                if chunk.data:
                    await self.pool.run(lambda c=chunk: rx.write(c.offset, c.data), timeout=120, what=f"writing {path}")
                if chunk.sha256:
                    await self.pool.run(lambda c=chunk: rx.commit(c.sha256), timeout=max(120.0, 60 + size / (50 << 20)),
                                        what=f"checking {path}")
                    committed = True
                    break
            if not committed:
                raise Aborted(f"the stream of {os.path.basename(path)} ended before its checksum; nothing was kept")
        except OSError as exc:  # e.g. ENOSPC: the datastore filled up meanwhile
            raise FailedPrecondition(f"writing {path} on the destination failed: {exc.strerror}; nothing was kept",
                                     field="volume") from None
        finally:
            if not committed:
                rx.discard()  # quick (close + unlink), safe to run here even while cancelled
        return rx.written

    async def remove(self, path: str) -> None:
        await self.pool.run(lambda: paths.unlink_if_there(path), timeout=60, what=f"removing {path}")

