"""tests/support/vnc_client.py, the RFB client the console-ticket e2e test judges with: its DES
against the FIPS 46 worked example and against vectors from an independent DES (OpenSSL's,
through `cryptography`, computed once and written down here), VNC's mirrored key bytes, and
the RFB 3.8 exchange against a small in-process server (OK and refused)."""

from __future__ import annotations

import os
import socket
import struct
import threading

import pytest

from support.vnc_client import VncAuthFailed, des_encrypt_block, handshake, vnc_key, vnc_response


def test_des_matches_the_fips_worked_example() -> None:
    key, plain = bytes.fromhex("133457799BBCDFF1"), bytes.fromhex("0123456789ABCDEF")
    assert des_encrypt_block(key, plain).hex() == "85e813540f0ab405"


@pytest.mark.parametrize("key,plain,cipher", [
    # single DES-ECB from OpenSSL (cryptography's TripleDES with the key three times)
    ("0000000000000000", "0000000000000000", "8ca64de9c1b123a7"),
    ("ffffffffffffffff", "ffffffffffffffff", "7359b2163e4edc58"),
    ("0123456789abcdef", "4e6f772069732074", "3fa40e8a984d4815"),
])
def test_des_matches_openssl(key: str, plain: str, cipher: str) -> None:
    assert des_encrypt_block(bytes.fromhex(key), bytes.fromhex(plain)).hex() == cipher


def test_the_vnc_key_is_the_first_eight_bytes_nul_padded_and_bit_mirrored() -> None:
    assert vnc_key("pw123") == bytes([0x0E, 0xEE, 0x8C, 0x4C, 0xCC, 0, 0, 0])
    assert vnc_key("abcdefghXYZ") == vnc_key("abcdefgh")  # VNC ignores the rest
    assert vnc_key("") == bytes(8)


def test_the_challenge_answer_matches_openssl() -> None:
    # OpenSSL DES-ECB under the mirrored key of "pw123", challenge 00 01 .. 0f
    assert vnc_response("pw123", bytes(range(16))).hex() == "54956590995492f22178483fa270fe9c"
    with pytest.raises(ValueError):
        vnc_response("pw123", b"short")


class FakeVncServer:
    """One connection at a time, RFB 3.8 with VNC Authentication for ``password``."""

    def __init__(self, password: str) -> None:
        self.password = password
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.shared: list[int] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _read(self, conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise ConnectionError
            buf += chunk
        return buf

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                try:
                    self._one(conn)
                except ConnectionError:
                    pass

    def _one(self, conn: socket.socket) -> None:
        conn.sendall(b"RFB 003.008\n")
        assert self._read(conn, 12) == b"RFB 003.008\n"
        conn.sendall(b"\x01\x02")
        assert self._read(conn, 1) == b"\x02"
        challenge = os.urandom(16)
        conn.sendall(challenge)
        if self._read(conn, 16) != vnc_response(self.password, challenge):
            reason = b"Authentication failed"
            conn.sendall(struct.pack(">II", 1, len(reason)) + reason)
            return
        conn.sendall(struct.pack(">I", 0))
        self.shared.append(self._read(conn, 1)[0])
        name = b"QEMU (fake)"
        conn.sendall(struct.pack(">HH", 640, 480) + bytes(16) + struct.pack(">I", len(name)) + name)
        request = self._read(conn, 10)
        assert request[0] == 3 and struct.unpack(">HH", request[6:]) == (640, 480)
        conn.sendall(b"\x02" + b"\x00\x00\x00\x01")  # a Bell, then a FramebufferUpdate of 1 rectangle

    def close(self) -> None:
        self.listener.close()


def test_a_handshake_with_the_right_password_reads_server_init_and_an_update() -> None:
    server = FakeVncServer("Tk7pQ2xZ")
    try:
        with handshake("127.0.0.1", server.port, "Tk7pQ2xZ", timeout=5) as session:
            assert (session.server_init.width, session.server_init.height, session.server_init.name) == (640, 480, "QEMU (fake)")
            assert session.framebuffer_update() == 1
        assert server.shared == [1]  # a shared session: other viewers stay connected
    finally:
        server.close()


def test_a_wrong_password_is_refused_with_the_servers_reason() -> None:
    server = FakeVncServer("Tk7pQ2xZ")
    try:
        with pytest.raises(VncAuthFailed) as exc:
            handshake("127.0.0.1", server.port, "Tk7pQ2xY", timeout=5)
        assert exc.value.reason == "Authentication failed"
    finally:
        server.close()
