"""External commands for storage work: argument lists, timeouts, stderr in every error.

Why an abstraction: the kernel iSCSI initiator, multipath and FC paths cannot run on machines
without a SCSI layer, so their code is exercised with a RecordingRunner that keeps every
argument list and answers with canned outputs, while production and the qemu-img/libiscsi
tests use SubprocessRunner. Both are synchronous and meant to run inside the storage
executor (cna_agent.storage.executor), never on the event loop.

A process stuck in uninterruptible sleep (a hung SAN) cannot be reaped; after the kill the
runner waits a bounded time and then gives up on it, so the calling thread is released.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

from cna_agent import cancel as cancelling
from cna_agent.errors import DeadlineExceeded, FailedPrecondition

#: qemu-img convert -p prints "    (12.34/100%)" followed by "\r".
PROGRESS_RE = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class CommandError(FailedPrecondition):
    """A command exited non-zero; the message carries its argument list and stderr."""

    code = "FAILED_PRECONDITION"

    def __init__(self, result: Result, what: str = "") -> None:
        tail = (result.stderr or result.stdout).strip()[-1500:]
        super().__init__(f"{what or result.argv[0]} failed (exit {result.returncode}): {' '.join(result.argv)}: {tail}")
        self.result = result


class CommandRunner(Protocol):
    def run(self, argv: Sequence[str], *, timeout: float, input: str | None = None, check: bool = True,
            env: Mapping[str, str] | None = None) -> Result: ...

    def run_progress(self, argv: Sequence[str], *, timeout: float, on_progress: Callable[[float], None]) -> Result: ...

    def write(self, path: str, data: str, *, timeout: float) -> None:
        """Write a sysfs control file (scan, delete, rescan)."""


class SubprocessRunner:
    """The real thing: subprocess with an argument list, never a shell."""

    def __init__(self, sysfs_write_timeout: float = 30.0) -> None:
        self.sysfs_write_timeout = sysfs_write_timeout

    def run(self, argv: Sequence[str], *, timeout: float, input: str | None = None, check: bool = True,
            env: Mapping[str, str] | None = None) -> Result:
        argv = tuple(argv)
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env={**os.environ, **env} if env else None, start_new_session=True)
        except FileNotFoundError:
            raise FailedPrecondition(f"{argv[0]} is not installed on this host (needed for: {' '.join(argv)})") from None
        unhook = cancelling.on_cancel(lambda: _signal(proc))  # a cancelled operation's command is killed
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            raise DeadlineExceeded(f"{' '.join(argv)} did not finish within {timeout:g}s (storage not answering?)") from None
        finally:
            unhook()
        cancelling.check()  # killed by a cancel: say so, not "exit -9"
        result = Result(argv, proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise CommandError(result)
        return result

    def run_progress(self, argv: Sequence[str], *, timeout: float, on_progress: Callable[[float], None]) -> Result:
        """Run a command printing qemu-img style progress on stdout; report each new percent."""
        argv = tuple(argv)
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True)
        except FileNotFoundError:
            raise FailedPrecondition(f"{argv[0]} is not installed on this host") from None
        err_chunks: list[bytes] = []
        err_thread = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
        err_thread.start()
        fired = threading.Event()

        def expire() -> None:
            fired.set()
            _kill(proc)

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        unhook = cancelling.on_cancel(lambda: _signal(proc))
        out = b""
        try:
            assert proc.stdout is not None
            while True:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                out = (out + chunk)[-4096:]
                found = PROGRESS_RE.findall(out)
                if found:
                    on_progress(float(found[-1]))
                    out = out[out.rfind(b")") + 1:]
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _kill(proc)
        finally:
            timer.cancel()
            unhook()
        err_thread.join(timeout=5)
        cancelling.check()
        stderr = b"".join(err_chunks).decode(errors="replace")
        if fired.is_set():
            raise DeadlineExceeded(f"{' '.join(argv)} did not finish within {timeout:g}s")
        result = Result(argv, proc.returncode if proc.returncode is not None else -9, "", stderr)
        if result.returncode != 0:
            raise CommandError(result)
        return result

    def write(self, path: str, data: str, *, timeout: float) -> None:
        # A sysfs write can block in the kernel (scan of a dead target); do it in a helper
        # thread so the caller's deadline holds even then.
        box: list[BaseException] = []

        def do() -> None:
            try:
                with open(path, "w") as fh:
                    fh.write(data)
            except BaseException as exc:  # pragma: no cover - reported below
                box.append(exc)

        t = threading.Thread(target=do, daemon=True, name="sysfs-write")
        t.start()
        t.join(timeout)
        if t.is_alive():
            raise DeadlineExceeded(f"writing {data.strip()!r} to {path} did not finish within {timeout:g}s")
        if box:
            exc = box[0]
            raise FailedPrecondition(f"writing {data.strip()!r} to {path} failed: {getattr(exc, 'strerror', None) or exc}")


def _signal(proc: subprocess.Popen) -> None:
    """SIGKILL the command's process group (its own session), without waiting."""
    try:
        os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(proc: subprocess.Popen) -> None:
    _signal(proc)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass  # stuck in D state on dead storage: leave it, release the thread


@dataclass
class Canned:
    """One scripted answer: argv prefix -> result (or a timeout); used ``times`` times (0 = always)."""

    prefix: tuple[str, ...]
    stdout: str = ""
    stderr: str = ""
    returncode: int = 0
    timeout: bool = False
    times: int = 0
    #: Called when it matches (e.g. to make a device node appear in the recorded tree).
    effect: Callable[[], None] | None = None


@dataclass
class RecordingRunner:
    """Records every argument list and sysfs write; replays canned outputs.

    For code paths this machine cannot run for real (kernel initiator, multipath, FC). A
    command nobody scripted answers exit 0 with empty output, but it is still recorded, so
    tests assert on exactly what would have run.
    """

    canned: list[Canned] = field(default_factory=list)
    calls: list[tuple[str, ...]] = field(default_factory=list)
    writes: list[tuple[str, str]] = field(default_factory=list)
    #: Optional hook for sysfs writes (e.g. "delete" removes the recorded device directory).
    on_write: Callable[[str, str], None] | None = None

    def add(self, *prefix: str, **kw: object) -> "RecordingRunner":
        self.canned.append(Canned(tuple(prefix), **kw))  # type: ignore[arg-type]
        return self

    def run(self, argv: Sequence[str], *, timeout: float, input: str | None = None, check: bool = True,
            env: Mapping[str, str] | None = None) -> Result:
        argv = tuple(argv)
        assert all(isinstance(a, str) for a in argv), argv
        self.calls.append(argv)
        for c in self.canned:
            if argv[: len(c.prefix)] == c.prefix:
                if c.times:
                    c.times -= 1
                    if c.times == 0:
                        self.canned.remove(c)
                if c.effect is not None:
                    c.effect()
                if c.timeout:
                    raise DeadlineExceeded(f"{' '.join(argv)} did not finish within {timeout:g}s")
                result = Result(argv, c.returncode, c.stdout, c.stderr)
                if check and c.returncode != 0:
                    raise CommandError(result)
                return result
        return Result(argv, 0, "", "")

    def run_progress(self, argv: Sequence[str], *, timeout: float, on_progress: Callable[[float], None]) -> Result:
        result = self.run(argv, timeout=timeout)
        for m in PROGRESS_RE.findall(result.stdout.encode()):
            on_progress(float(m))
        return result

    def write(self, path: str, data: str, *, timeout: float) -> None:
        self.writes.append((path, data))
        if self.on_write is not None:
            self.on_write(path, data)

    def commands(self, name: str) -> list[tuple[str, ...]]:
        return [c for c in self.calls if c and c[0] == name]
