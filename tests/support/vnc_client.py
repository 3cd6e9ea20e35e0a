"""A minimal RFB (VNC) client: the version handshake, VNC Authentication (security type 2),
ClientInit/ServerInit, and one framebuffer update request; enough to prove from outside the
agent that a console ticket opens a session (or is refused) on QEMU's own VNC server.

Why our own, with its own DES: the venv has no VNC client and no DES (no `cryptography`,
no pycryptodome), and VNC's challenge answer is plain single DES-ECB, about a hundred lines.
It is test code: clear rather than fast, never for real secrets.

RFB 3.8 (RFC 6143): the server sends "RFB 003.008\\n", the client echoes its version; the
server lists its security types, the client picks 2; the server sends a 16-byte challenge, the
client answers DES-ECB(challenge) under the password as the key (at most 8 bytes, NUL-padded,
each byte's bits reversed: VNC's historic quirk); the server says SecurityResult 0 (OK) or 1
with a reason. Then ClientInit (shared flag) and ServerInit (width, height, pixel format, name).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

# -- DES (FIPS 46-3), single block, encryption only ------------------------------------------

_IP = [58, 50, 42, 34, 26, 18, 10, 2, 60, 52, 44, 36, 28, 20, 12, 4,
       62, 54, 46, 38, 30, 22, 14, 6, 64, 56, 48, 40, 32, 24, 16, 8,
       57, 49, 41, 33, 25, 17, 9, 1, 59, 51, 43, 35, 27, 19, 11, 3,
       61, 53, 45, 37, 29, 21, 13, 5, 63, 55, 47, 39, 31, 23, 15, 7]
#: The final permutation is IP's inverse.
_FP = [_IP.index(i) + 1 for i in range(1, 65)]
_E = [32, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 8, 9, 10, 11, 12, 13, 12, 13, 14, 15, 16, 17,
      16, 17, 18, 19, 20, 21, 20, 21, 22, 23, 24, 25, 24, 25, 26, 27, 28, 29, 28, 29, 30, 31, 32, 1]
_P = [16, 7, 20, 21, 29, 12, 28, 17, 1, 15, 23, 26, 5, 18, 31, 10,
      2, 8, 24, 14, 32, 27, 3, 9, 19, 13, 30, 6, 22, 11, 4, 25]
_PC1 = [57, 49, 41, 33, 25, 17, 9, 1, 58, 50, 42, 34, 26, 18, 10, 2, 59, 51, 43, 35, 27, 19, 11, 3, 60, 52, 44, 36,
        63, 55, 47, 39, 31, 23, 15, 7, 62, 54, 46, 38, 30, 22, 14, 6, 61, 53, 45, 37, 29, 21, 13, 5, 28, 20, 12, 4]
_PC2 = [14, 17, 11, 24, 1, 5, 3, 28, 15, 6, 21, 10, 23, 19, 12, 4, 26, 8, 16, 7, 27, 20, 13, 2,
        41, 52, 31, 37, 47, 55, 30, 40, 51, 45, 33, 48, 44, 49, 39, 56, 34, 53, 46, 42, 50, 36, 29, 32]
_SHIFTS = [1, 1, 2, 2, 2, 2, 2, 2, 1, 2, 2, 2, 2, 2, 2, 1]
_S = [
    [14, 4, 13, 1, 2, 15, 11, 8, 3, 10, 6, 12, 5, 9, 0, 7, 0, 15, 7, 4, 14, 2, 13, 1, 10, 6, 12, 11, 9, 5, 3, 8,
     4, 1, 14, 8, 13, 6, 2, 11, 15, 12, 9, 7, 3, 10, 5, 0, 15, 12, 8, 2, 4, 9, 1, 7, 5, 11, 3, 14, 10, 0, 6, 13],
    [15, 1, 8, 14, 6, 11, 3, 4, 9, 7, 2, 13, 12, 0, 5, 10, 3, 13, 4, 7, 15, 2, 8, 14, 12, 0, 1, 10, 6, 9, 11, 5,
     0, 14, 7, 11, 10, 4, 13, 1, 5, 8, 12, 6, 9, 3, 2, 15, 13, 8, 10, 1, 3, 15, 4, 2, 11, 6, 7, 12, 0, 5, 14, 9],
    [10, 0, 9, 14, 6, 3, 15, 5, 1, 13, 12, 7, 11, 4, 2, 8, 13, 7, 0, 9, 3, 4, 6, 10, 2, 8, 5, 14, 12, 11, 15, 1,
     13, 6, 4, 9, 8, 15, 3, 0, 11, 1, 2, 12, 5, 10, 14, 7, 1, 10, 13, 0, 6, 9, 8, 7, 4, 15, 14, 3, 11, 5, 2, 12],
    [7, 13, 14, 3, 0, 6, 9, 10, 1, 2, 8, 5, 11, 12, 4, 15, 13, 8, 11, 5, 6, 15, 0, 3, 4, 7, 2, 12, 1, 10, 14, 9,
     10, 6, 9, 0, 12, 11, 7, 13, 15, 1, 3, 14, 5, 2, 8, 4, 3, 15, 0, 6, 10, 1, 13, 8, 9, 4, 5, 11, 12, 7, 2, 14],
    [2, 12, 4, 1, 7, 10, 11, 6, 8, 5, 3, 15, 13, 0, 14, 9, 14, 11, 2, 12, 4, 7, 13, 1, 5, 0, 15, 10, 3, 9, 8, 6,
     4, 2, 1, 11, 10, 13, 7, 8, 15, 9, 12, 5, 6, 3, 0, 14, 11, 8, 12, 7, 1, 14, 2, 13, 6, 15, 0, 9, 10, 4, 5, 3],
    [12, 1, 10, 15, 9, 2, 6, 8, 0, 13, 3, 4, 14, 7, 5, 11, 10, 15, 4, 2, 7, 12, 9, 5, 6, 1, 13, 14, 0, 11, 3, 8,
     9, 14, 15, 5, 2, 8, 12, 3, 7, 0, 4, 10, 1, 13, 11, 6, 4, 3, 2, 12, 9, 5, 15, 10, 11, 14, 1, 7, 6, 0, 8, 13],
    [4, 11, 2, 14, 15, 0, 8, 13, 3, 12, 9, 7, 5, 10, 6, 1, 13, 0, 11, 7, 4, 9, 1, 10, 14, 3, 5, 12, 2, 15, 8, 6,
     1, 4, 11, 13, 12, 3, 7, 14, 10, 15, 6, 8, 0, 5, 9, 2, 6, 11, 13, 8, 1, 4, 10, 7, 9, 5, 0, 15, 14, 2, 3, 12],
    [13, 2, 8, 4, 6, 15, 11, 1, 10, 9, 3, 14, 5, 0, 12, 7, 1, 15, 13, 8, 10, 3, 7, 4, 12, 5, 6, 11, 0, 14, 9, 2,
     7, 11, 4, 1, 9, 12, 14, 2, 0, 6, 10, 13, 15, 3, 5, 8, 2, 1, 14, 7, 4, 10, 8, 13, 15, 12, 9, 0, 3, 5, 6, 11],
]


def _permute(value: int, table: list[int], width: int) -> int:
    """Bit ``table[i]`` (1 = most significant of ``width``) of value becomes output bit i."""
    out = 0
    for pos in table:
        out = (out << 1) | ((value >> (width - pos)) & 1)
    return out


def _subkeys(key: bytes) -> list[int]:
    cd = _permute(int.from_bytes(key, "big"), _PC1, 64)
    c, d = cd >> 28, cd & 0xFFFFFFF
    keys = []
    for shift in _SHIFTS:
        c = ((c << shift) | (c >> (28 - shift))) & 0xFFFFFFF
        d = ((d << shift) | (d >> (28 - shift))) & 0xFFFFFFF
        keys.append(_permute((c << 28) | d, _PC2, 56))
    return keys


def _feistel(r: int, k: int) -> int:
    x = _permute(r, _E, 32) ^ k
    out = 0
    for i in range(8):
        six = (x >> (42 - 6 * i)) & 0x3F
        row, col = ((six >> 4) & 2) | (six & 1), (six >> 1) & 0xF
        out = (out << 4) | _S[i][row * 16 + col]
    return _permute(out, _P, 32)


def des_encrypt_block(key: bytes, block: bytes) -> bytes:
    """DES-ECB of one 8-byte block under an 8-byte key (parity bits ignored, as DES does)."""
    if len(key) != 8 or len(block) != 8:
        raise ValueError("DES takes an 8-byte key and 8-byte blocks")
    x = _permute(int.from_bytes(block, "big"), _IP, 64)
    left, right = x >> 32, x & 0xFFFFFFFF
    for k in _subkeys(key):
        left, right = right, left ^ _feistel(right, k)
    return _permute((right << 32) | left, _FP, 64).to_bytes(8, "big")


def _reverse_bits(b: int) -> int:
    return int(f"{b:08b}"[::-1], 2)


def vnc_key(password: str) -> bytes:
    """The DES key VNC derives from a password: its first 8 bytes (NUL-padded), each mirrored."""
    raw = password.encode("latin-1")[:8].ljust(8, b"\0")
    return bytes(_reverse_bits(b) for b in raw)


def vnc_response(password: str, challenge: bytes) -> bytes:
    """The answer to VNC Authentication's 16-byte challenge: two DES-ECB blocks."""
    if len(challenge) != 16:
        raise ValueError(f"a VNC challenge is 16 bytes, not {len(challenge)}")
    key = vnc_key(password)
    return des_encrypt_block(key, challenge[:8]) + des_encrypt_block(key, challenge[8:])


# -- RFB -----------------------------------------------------------------------------------

class VncAuthFailed(Exception):
    """The server refused the password (SecurityResult 1) or closed the connection instead."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class ServerInit:
    width: int
    height: int
    name: str


class VncSession:
    """An authenticated RFB session: ``server_init`` tells the framebuffer QEMU serves."""

    def __init__(self, sock: socket.socket, server_init: ServerInit) -> None:
        self.sock = sock
        self.server_init = server_init

    def framebuffer_update(self) -> int:
        """Ask for the whole screen and read the reply's header: its rectangle count (proves
        the session is alive, e.g. after the ticket was burned under it)."""
        w, h = self.server_init.width, self.server_init.height
        self.sock.sendall(struct.pack(">BBHHHH", 3, 0, 0, 0, w, h))
        while True:
            kind = _recv(self.sock, 1)[0]
            if kind == 0:  # FramebufferUpdate: padding, number of rectangles
                return struct.unpack(">xH", _recv(self.sock, 3))[0]
            if kind == 2:  # Bell: no body
                continue
            raise AssertionError(f"unexpected RFB server message type {kind}")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "VncSession":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"the VNC server closed the connection ({len(buf)} of {n} bytes read)")
        buf += chunk
    return buf


def _reason(sock: socket.socket) -> str:
    (length,) = struct.unpack(">I", _recv(sock, 4))
    return _recv(sock, length).decode(errors="replace")


def handshake(host: str, port: int, password: str, *, timeout: float = 10.0, shared: bool = True) -> VncSession:
    """Connect, authenticate with ``password`` and initialise; a VncSession, or VncAuthFailed
    when the server refuses the password. Anything else unexpected is an AssertionError."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        version = _recv(sock, 12)
        assert version.startswith(b"RFB 003."), f"not an RFB server: {version!r}"
        sock.sendall(b"RFB 003.008\n")
        (count,) = _recv(sock, 1)
        if count == 0:
            raise AssertionError(f"the server offers no security type: {_reason(sock)}")
        types = list(_recv(sock, count))
        assert 2 in types, f"the server does not offer VNC Authentication (types {types})"
        sock.sendall(b"\x02")
        challenge = _recv(sock, 16)
        sock.sendall(vnc_response(password, challenge))
        try:
            (result,) = struct.unpack(">I", _recv(sock, 4))
        except ConnectionError as exc:
            raise VncAuthFailed(f"connection closed instead of a SecurityResult ({exc})") from None
        if result != 0:
            try:
                reason = _reason(sock)
            except ConnectionError:
                reason = ""
            raise VncAuthFailed(reason or f"SecurityResult {result}")
        sock.sendall(b"\x01" if shared else b"\x00")
        width, height = struct.unpack(">HH", _recv(sock, 4))
        _recv(sock, 16)  # pixel format
        name = _reason(sock)
        return VncSession(sock, ServerInit(width, height, name))
    except BaseException:
        sock.close()
        raise
