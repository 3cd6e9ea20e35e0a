"""A small synchronous NBD client: what a pull-mode backup needs and no more.

Why our own: a pull backup is read through the NBD export QEMU serves for it (libvirt's
backupBegin), and only the changed blocks may be read for an incremental one, which takes the
NBD block-status command with the backup's dirty-bitmap meta context. qemu-img cannot copy
"only these extents" into an image, and libnbd (what oVirt's imageio and virt-v2v use) is not a
dependency we can count on in the agent's environment (Debian ships python3-libnbd, the venv and
openEuler's python3 may not see it). The protocol part needed is small and fixed
(https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md): fixed-newstyle handshake,
structured replies, NBD_OPT_SET_META_CONTEXT, NBD_OPT_GO, and the READ, WRITE, WRITE_ZEROES,
FLUSH, BLOCK_STATUS and DISC commands. Requests are sent one at a time (no pipelining): simple,
and fast enough over a local unix socket.

Errors are NbdError with the server's message; every socket operation has a timeout.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Iterator

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 7, 8, 10
REP_ACK, REP_INFO, REP_META_CONTEXT = 1, 3, 4
REP_ERROR_BIT = 1 << 31
INFO_EXPORT = 0

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 0, 1, 2, 3, 6, 7
CHUNK_NONE, CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, CHUNK_BLOCK_STATUS = 0, 1, 2, 5
CHUNK_ERROR_BIT = 1 << 15
REPLY_FLAG_DONE = 1

#: base:allocation flags
STATE_HOLE, STATE_ZERO = 1, 2
#: qemu:dirty-bitmap:* flag
STATE_DIRTY = 1
BASE_ALLOCATION = "base:allocation"
#: Largest single READ/WRITE sent (QEMU's limit is 32 MiB).
MAX_IO = 4 << 20


class NbdError(Exception):
    pass


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    flags: int


class NbdClient:
    """One connection to one export (``unix`` socket path, export ``name``); ``contexts``
    are the meta contexts to ask for (block status is available for those the server grants)."""

    def __init__(self, unix_path: str, name: str, *, contexts: tuple[str, ...] = (), timeout: float = 60.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._cookie = 0
        self.contexts: dict[str, int] = {}
        try:
            self._sock.connect(unix_path)
            self._handshake(name, contexts)
        except BaseException:
            self._sock.close()
            raise

    # -- wire ------------------------------------------------------------------------------------

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            part = self._sock.recv(n - len(buf))
            if not part:
                raise NbdError("the NBD server closed the connection")
            buf += part
        return bytes(buf)

    def _option(self, option: int, data: bytes = b"") -> None:
        self._sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def _option_reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, rtype, length = struct.unpack(">QIII", self._recv(20))
        if magic != OPT_REPLY_MAGIC or opt != option:
            raise NbdError(f"unexpected option reply (magic {magic:#x}, option {opt})")
        data = self._recv(length)
        if rtype & REP_ERROR_BIT:
            raise NbdError(f"the server refused option {option}: {data.decode(errors='replace') or rtype}")
        return rtype, data

    def _handshake(self, name: str, contexts: tuple[str, ...]) -> None:
        if self._recv(8) != NBDMAGIC or struct.unpack(">Q", self._recv(8))[0] != IHAVEOPT:
            raise NbdError("not a fixed-newstyle NBD server")
        (flags,) = struct.unpack(">H", self._recv(2))
        if not flags & FLAG_FIXED_NEWSTYLE:
            raise NbdError("the NBD server does not speak fixed newstyle")
        self._sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))
        self._option(OPT_STRUCTURED_REPLY)
        self._option_reply(OPT_STRUCTURED_REPLY)
        exp = name.encode()
        if contexts:
            queries = b"".join(struct.pack(">I", len(c.encode())) + c.encode() for c in contexts)
            self._option(OPT_SET_META_CONTEXT, struct.pack(">I", len(exp)) + exp + struct.pack(">I", len(contexts)) + queries)
            while True:
                rtype, data = self._option_reply(OPT_SET_META_CONTEXT)
                if rtype == REP_ACK:
                    break
                if rtype == REP_META_CONTEXT:
                    self.contexts[data[4:].decode()] = struct.unpack(">I", data[:4])[0]
        self._option(OPT_GO, struct.pack(">I", len(exp)) + exp + struct.pack(">H", 0))
        self.size = -1
        while True:
            rtype, data = self._option_reply(OPT_GO)
            if rtype == REP_ACK:
                break
            if rtype == REP_INFO and struct.unpack(">H", data[:2])[0] == INFO_EXPORT:
                self.size, self.export_flags = struct.unpack(">QH", data[2:12])
        if self.size < 0:
            raise NbdError(f"the server did not say the size of export {name!r}")

    def _request(self, cmd: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0) -> int:
        self._cookie += 1
        self._sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, self._cookie, offset, length) + data)
        return self._cookie

    def _replies(self, cookie: int) -> Iterator[tuple[int, bytes]]:
        """(chunk type, payload) of the reply to ``cookie``; a simple reply is one NONE chunk
        (its data, for a READ, is read by the caller: see read())."""
        while True:
            (magic,) = struct.unpack(">I", self._recv(4))
            if magic == SIMPLE_REPLY_MAGIC:
                error, got = struct.unpack(">IQ", self._recv(12))
                if got != cookie:
                    raise NbdError("reply for another request")
                if error:
                    raise NbdError(f"the NBD server failed the request (errno {error})")
                yield CHUNK_NONE, b""
                return
            if magic != STRUCTURED_REPLY_MAGIC:
                raise NbdError(f"bad reply magic {magic:#x}")
            flags, ctype, got, length = struct.unpack(">HHQI", self._recv(16))
            payload = self._recv(length)
            if got != cookie:
                raise NbdError("reply for another request")
            if ctype & CHUNK_ERROR_BIT:
                error, mlen = struct.unpack(">IH", payload[:6])
                raise NbdError(f"the NBD server failed the request (errno {error}): "
                               f"{payload[6:6 + mlen].decode(errors='replace')}")
            yield ctype, payload
            if flags & REPLY_FLAG_DONE:
                return

    # -- commands ------------------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)  # holes read as zeros
        for ctype, payload in self._replies(self._request(CMD_READ, offset, length)):
            if ctype == CHUNK_OFFSET_DATA:
                (at,) = struct.unpack(">Q", payload[:8])
                buf[at - offset:at - offset + len(payload) - 8] = payload[8:]
            elif ctype == CHUNK_NONE and not payload:
                pass
        return bytes(buf)

    def write(self, offset: int, data: bytes) -> None:
        for _ in self._replies(self._request(CMD_WRITE, offset, len(data), data)):
            pass

    def write_zeroes(self, offset: int, length: int) -> None:
        for _ in self._replies(self._request(CMD_WRITE_ZEROES, offset, length)):
            pass

    def flush(self) -> None:
        for _ in self._replies(self._request(CMD_FLUSH)):
            pass

    def extents(self, context: str, offset: int = 0, length: int | None = None) -> Iterator[Extent]:
        """The export's extents in ``context`` from ``offset`` on (``length`` bytes, default to
        the end), in order, contiguous; the server may describe less per request: asked again."""
        cid = self.contexts.get(context)
        if cid is None:
            raise NbdError(f"the server did not grant the meta context {context!r}")
        end = self.size if length is None else min(self.size, offset + length)
        at = offset
        while at < end:
            ask = min(end - at, 1 << 30)
            got = []
            for ctype, payload in self._replies(self._request(CMD_BLOCK_STATUS, at, ask)):
                if ctype == CHUNK_BLOCK_STATUS and struct.unpack(">I", payload[:4])[0] == cid:
                    body = payload[4:]
                    got += [struct.unpack(">II", body[i:i + 8]) for i in range(0, len(body), 8)]
            if not got:
                raise NbdError(f"no block status for {context!r} at {at}")
            for length_, flags in got:
                length_ = min(length_, end - at)
                if length_ <= 0:
                    break
                yield Extent(at, length_, flags)
                at += length_

    def close(self) -> None:
        try:
            self._request(CMD_DISC)
        except OSError:
            pass
        self._sock.close()

    def __enter__(self) -> "NbdClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
