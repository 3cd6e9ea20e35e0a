"""Read and drive the serial console of a test guest built by tools/build-test-guest.py.

Why: tests observe the guest instead of trusting libvirt's state. The guest prints
``CNA-FACT key=value`` lines, a ``<MARKER> boot=<n>`` line per boot, ``CNA-HOTPLUG ...`` lines and
``CNA-GUEST-POWEROFF``, then offers a root shell (prompt ``cna# ``) on the same serial port.

Ways in, usually two on one ``<serial>`` (see :func:`support.guests.domain_xml`):

* :class:`SerialLog` reads the chardev's log file (everything since the QEMU process started,
  across guest reboots) and waits for a line with a timeout.
* :class:`ConsoleSocket` connects to a ``<serial type='unix'>`` socket, collects what arrives from
  then on and runs shell commands, returning their exit code and output.
* :class:`AgentConsole` is the same shell through the agent's SerialConsole gRPC stream.
* :class:`Console` is that stream as the e2e tests of the stream itself use it: it records how
  the stream ended (``ended``, ``error``) and matches the raw bytes, partial lines included.
"""

from __future__ import annotations

import re
import socket
import threading
import time
import uuid
from pathlib import Path

# ANSI/VT escapes the busybox line editor emits (e.g. ESC[6n cursor queries)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


def clean(text: str) -> str:
    """Console text without terminal escapes and carriage returns."""
    return _ANSI.sub("", text)


def facts(text: str) -> dict[str, str]:
    """The CNA-FACT key=value pairs of the most recent boot in text."""
    out: dict[str, str] = {}
    for line in clean(text).splitlines():
        m = re.match(r"^CNA-FACT ([^=\s]+)=(.*)$", line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


class ConsoleTimeout(AssertionError):
    """A line did not appear in time; the message carries the console tail for diagnosis."""


class _Waiter:
    def _text(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def text(self) -> str:
        """Everything seen so far, cleaned of terminal escapes."""
        return clean(self._text())

    def count(self, pattern: str) -> int:
        """How many lines match pattern (a regex searched within each line)."""
        rx = re.compile(pattern)
        return sum(1 for line in self.text().splitlines() if rx.search(line))

    def wait_for(self, pattern: str, timeout: float = 60.0, count: int = 1, partial: bool = False) -> re.Match:
        """Wait until at least count lines match pattern; return the match in the last one.

        Only complete lines count, so a line still being written is not matched half-way;
        partial=True also matches the unfinished last line (for prompts such as ``cna# ``).
        """
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            complete = text if partial else text[: text.rfind("\n") + 1]
            hits = [m for m in (rx.search(line) for line in complete.splitlines()) if m]
            if len(hits) >= count:
                return hits[count - 1]
            if time.monotonic() > deadline:
                raise ConsoleTimeout(f"{pattern!r} x{count} not seen within {timeout}s "
                                     f"(seen {len(hits)}); console tail:\n{text[-3000:]}")
            time.sleep(0.1)


class _Shell(_Waiter):
    """A console the test can type into: subclasses provide send() and feed what arrives
    (from their own reader thread) to _received()."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._lock = threading.Lock()

    def _received(self, data: bytes) -> None:
        with self._lock:
            self._buf += data

    def _text(self) -> str:
        with self._lock:
            return bytes(self._buf).decode("utf-8", "replace")

    def send(self, data: str) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self, command: str, timeout: float = 30.0) -> tuple[int, str]:
        """Run one shell command in the guest; return (exit code, output).

        The command is wrapped with begin/end tags carrying a random token; the typed line is
        echoed by the guest shell, but only the executed echo prints the tag *with* the exit
        status digits, so the echo of the command line is never mistaken for its output.
        """
        tok = uuid.uuid4().hex[:10]
        start = len(self.text())
        self.send(f"echo B{tok}B; {command}; echo E{tok}E$?\n")
        rx_end = re.compile(rf"E{tok}E(\d+)")
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()[start:]
            m = rx_end.search(text)
            if m:
                b = text.find(f"B{tok}B\n")
                body = text[b + len(tok) + 3: m.start()] if b >= 0 else text[: m.start()]
                return int(m.group(1)), body
            if time.monotonic() > deadline:
                raise ConsoleTimeout(f"command {command!r} did not finish within {timeout}s; "
                                     f"console tail:\n{text[-3000:]}")
            time.sleep(0.05)


class SerialLog(_Waiter):
    """A serial console log file (QEMU chardev ``logfile`` / libvirt ``<log file=...>``)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def _text(self) -> str:
        try:
            return self.path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""


class ConsoleSocket(_Shell):
    """An interactive connection to a unix-socket serial chardev (QEMU is the server).

    A reader thread collects output so a slow test never makes QEMU block on a full socket.
    """

    def __init__(self, path: Path | str, connect_timeout: float = 30.0) -> None:
        super().__init__()
        self.path = str(path)
        deadline = time.monotonic() + connect_timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self._sock = s
        self._closed = False
        self._thread = threading.Thread(target=self._reader, name=f"console:{self.path}", daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            self._received(data)

    def send(self, data: str) -> None:
        self._sock.sendall(data.encode())

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "ConsoleSocket":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AgentConsole(_Shell):
    """The guest's serial console through the agent's SerialConsole gRPC stream (what the VRM and
    ``cna-ctl vm console`` use), for VMs whose console is a libvirt pty.

    ``force`` takes the console over from an earlier session (libvirt can report a cancelled
    stream's session as still active for a while).
    """

    def __init__(self, channel: object, vm_ref: str, force: bool = True) -> None:
        import queue

        from cna_agent.api import pb

        super().__init__()
        vm = pb.vm_pb2
        self._q: "queue.Queue[bytes | None]" = queue.Queue()
        self.error: Exception | None = None

        def inputs():
            yield vm.SerialConsoleInput(vm=vm_ref, force=force)
            while (item := self._q.get()) is not None:
                yield vm.SerialConsoleInput(data=item)

        self._call = pb.vm_pb2_grpc.VmServiceStub(channel).SerialConsole(inputs(), timeout=3600)

        def pump() -> None:
            try:
                for msg in self._call:
                    self._received(msg.data)
            except Exception as exc:  # grpc.RpcError when cancelled or the VM stops
                self.error = exc

        self._thread = threading.Thread(target=pump, name=f"agent-console:{vm_ref}", daemon=True)
        self._thread.start()

    def send(self, data: str) -> None:
        self._q.put(data.encode())

    def close(self) -> None:
        self._q.put(None)
        self._call.cancel()
        self._thread.join(timeout=5)

    def __enter__(self) -> "AgentConsole":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Console:
    """A SerialConsole stream driven from a thread: send() types, wait_for() reads.

    Unlike :class:`AgentConsole` it keeps how the stream ended (``ended`` is set, ``error`` holds
    the RpcError), for tests of the stream's rules (one session at a time, force, a stopped VM).
    """

    def __init__(self, stub, vm_ref: str, force: bool = False) -> None:
        import queue

        import grpc

        from cna_agent.api import pb

        vm = pb.vm_pb2
        self.inq: "queue.Queue" = queue.Queue()
        self.buf = b""
        self.error: grpc.RpcError | None = None
        self.ended = threading.Event()

        def inputs():
            yield vm.SerialConsoleInput(vm=vm_ref, force=force)
            while True:
                item = self.inq.get()
                if item is None:
                    return
                yield vm.SerialConsoleInput(data=item)

        self.call = stub.SerialConsole(inputs(), timeout=300)

        def pump():
            try:
                for msg in self.call:
                    self.buf += msg.data
            except grpc.RpcError as exc:
                self.error = exc
            self.ended.set()

        threading.Thread(target=pump, daemon=True).start()

    def send(self, text: str) -> None:
        self.inq.put(text.encode())

    def wait_for(self, pattern: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern.encode(), self.buf, re.M)
            if m:
                return m.group(0).decode()
            if self.ended.is_set():
                break
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} not seen on the console (ended={self.ended.is_set()}, error={self.error}); "
                             f"got {self.buf[-500:]!r}")

    def close(self) -> None:
        self.inq.put(None)
        self.call.cancel()


def login_root(console: _Shell, password: str, timeout: float = 120.0) -> None:
    """Log in as root on a real guest's serial getty (the Debian guest: its root prompt is
    ``cna# ``, so :meth:`_Shell.run` works afterwards as on the busybox guest). A newline is
    sent until ``login:`` shows: the getty may have printed its prompt before the console opened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        console.send("\n")
        try:
            console.wait_for(r"login: ?$", timeout=5, partial=True)
            break
        except AssertionError:
            continue
    console.send("root\n")
    console.wait_for(r"Password: ?$", timeout=30, partial=True)
    console.send(password + "\n")
    console.wait_for(r"cna# ?$", timeout=60, partial=True)

