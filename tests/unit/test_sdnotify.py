"""cna_agent.sdnotify against real AF_UNIX datagram sockets standing in for systemd.

A fake transport would prove nothing about addressing (abstract "@" names, path encoding) or
datagram framing, which is where sd_notify clients go wrong; a real socket is cheap.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator

import pytest

from cna_agent.sdnotify import SystemdNotifier, watchdog_loop


class Receiver:
    """The service manager's end: a bound AF_UNIX SOCK_DGRAM socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def recv(self, timeout: float = 2.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(65536).decode()
        assert data.endswith("\n")
        return dict(line.split("=", 1) for line in data.splitlines())

    def drain(self) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        self.sock.setblocking(False)
        try:
            while True:
                data = self.sock.recv(65536).decode()
                out.append(dict(line.split("=", 1) for line in data.splitlines()))
        except BlockingIOError:
            return out
        finally:
            self.sock.setblocking(True)


@pytest.fixture
def fs_receiver() -> Iterator[Receiver]:
    # A short directory: sun_path holds only 108 bytes and pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="sdn") as d:
        path = os.path.join(d, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            yield Receiver(sock, path)


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"cna-sdnotify-test-{os.getpid()}-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield Receiver(sock, "@" + name)


@pytest.fixture(params=["fs", "abstract"])
def receiver(request: pytest.FixtureRequest, fs_receiver: Receiver, abstract_receiver: Receiver) -> Receiver:
    return fs_receiver if request.param == "fs" else abstract_receiver


def test_messages_reach_the_socket(receiver: Receiver) -> None:
    n = SystemdNotifier({"NOTIFY_SOCKET": receiver.env_value})
    assert n.enabled
    assert n.ready(status="serving 3 guests")
    assert receiver.recv() == {"READY": "1", "STATUS": "serving 3 guests"}
    assert n.status("reconciling 1/2")
    assert receiver.recv() == {"STATUS": "reconciling 1/2"}
    assert n.watchdog()
    assert receiver.recv() == {"WATCHDOG": "1"}
    assert n.stopping()
    assert receiver.recv() == {"STOPPING": "1"}
    assert n.ready()
    assert receiver.recv() == {"READY": "1"}
    assert n.extend_timeout(1.5)
    assert receiver.recv() == {"EXTEND_TIMEOUT_USEC": "1500000"}


def test_reloading_carries_monotonic_usec(fs_receiver: Receiver) -> None:
    n = SystemdNotifier({"NOTIFY_SOCKET": fs_receiver.env_value})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading(status="reloading config")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    msg = fs_receiver.recv()
    assert msg["RELOADING"] == "1"
    assert msg["STATUS"] == "reloading config"
    assert before <= int(msg["MONOTONIC_USEC"]) <= after


def test_newlines_cannot_inject_fields(fs_receiver: Receiver) -> None:
    n = SystemdNotifier({"NOTIFY_SOCKET": fs_receiver.env_value})
    assert n.status("libvirt down:\nREADY=1\r\nSTOPPING=1")
    assert fs_receiver.recv() == {"STATUS": "libvirt down: READY=1 STOPPING=1"}


def test_invalid_field_names_are_programming_errors() -> None:
    n = SystemdNotifier({})
    with pytest.raises(ValueError):
        n.notify(ready=1)
    with pytest.raises(ValueError):
        n.notify()


def test_noop_without_notify_socket() -> None:
    n = SystemdNotifier({})
    assert not n.enabled
    assert n.ready(status="x") is False
    assert n.watchdog() is False
    assert n.watchdog_interval() is None


def test_default_environment_is_read_and_left_alone(fs_receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", fs_receiver.env_value)
    n = SystemdNotifier()
    assert n.ready()
    assert fs_receiver.recv() == {"READY": "1"}
    assert os.environ["NOTIFY_SOCKET"] == fs_receiver.env_value


def test_unset_environment_on_request(fs_receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", fs_receiver.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    n = SystemdNotifier(unset_environment=True)
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
    assert n.watchdog()  # the notifier keeps its own copy
    assert fs_receiver.recv() == {"WATCHDOG": "1"}


@pytest.mark.parametrize("value", ["/nonexistent/cna-agent/notify", "@cna-nobody-listens-" + uuid.uuid4().hex])
def test_send_failure_never_raises(value: str) -> None:
    n = SystemdNotifier({"NOTIFY_SOCKET": value})
    assert n.enabled
    assert n.ready() is False
    assert n.watchdog() is False


@pytest.mark.parametrize("value", ["relative/path", "@", "vsock:2:1234"])
def test_unsupported_socket_values_disable_notifications(value: str) -> None:
    n = SystemdNotifier({"NOTIFY_SOCKET": value})
    assert not n.enabled
    assert n.ready() is False


def test_watchdog_interval_is_half_the_timeout(fs_receiver: Receiver) -> None:
    env = {"NOTIFY_SOCKET": fs_receiver.env_value, "WATCHDOG_USEC": "30000000"}
    assert SystemdNotifier(env).watchdog_interval() == pytest.approx(15.0)
    env["WATCHDOG_PID"] = str(os.getpid())
    assert SystemdNotifier(env).watchdog_interval() == pytest.approx(15.0)


@pytest.mark.parametrize(
    "extra",
    [
        {"WATCHDOG_PID": "1"},  # another process (our parent was watched, not us)
        {"WATCHDOG_PID": "not-a-pid"},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": ""},
    ],
)
def test_watchdog_interval_disabled(fs_receiver: Receiver, extra: dict[str, str]) -> None:
    env = {"NOTIFY_SOCKET": fs_receiver.env_value, "WATCHDOG_USEC": "30000000", **extra}
    assert SystemdNotifier(env).watchdog_interval() is None


def test_watchdog_needs_a_socket() -> None:
    assert SystemdNotifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval() is None


def _run_until_calls(notifier: SystemdNotifier, answers: list[object], *, interval: float | None) -> int:
    """Run watchdog_loop until healthy() was asked len(answers) times; returns the call count.

    Each answer is returned in turn: a bool, an exception to raise, or "async:<bool>" /
    "hang" for coroutine answers; after the script runs out healthy() answers False.
    """

    async def main() -> int:
        calls = 0
        done = asyncio.Event()

        def healthy() -> object:
            nonlocal calls
            # Past the script: unhealthy, so a tick that sneaks in before cancel() adds no ping.
            answer = answers[calls] if calls < len(answers) else False
            calls += 1
            if calls >= len(answers):
                done.set()
            if isinstance(answer, BaseException):
                raise answer
            if answer == "hang":
                return asyncio.sleep(3600, result=True)
            if isinstance(answer, str) and answer.startswith("async:"):
                return asyncio.sleep(0, result=answer == "async:True")
            return answer

        task = asyncio.create_task(watchdog_loop(notifier, healthy, interval=interval))
        await asyncio.wait_for(done.wait(), timeout=10)
        # Let the last tick finish its (withheld or sent) ping before stopping the loop.
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return calls

    return asyncio.run(main())


def _pings(receiver: Receiver) -> int:
    msgs = receiver.drain()
    assert all(m == {"WATCHDOG": "1"} for m in msgs)
    return len(msgs)


def test_watchdog_loop_stops_pinging_when_unhealthy(receiver: Receiver) -> None:
    # WATCHDOG_USEC=40ms -> a ping period of 20ms, taken from the environment as in production.
    n = SystemdNotifier({"NOTIFY_SOCKET": receiver.env_value, "WATCHDOG_USEC": "40000"})
    _run_until_calls(n, [True, True, True] + [False] * 6, interval=None)
    assert _pings(receiver) == 3


def test_watchdog_loop_resumes_after_recovery(fs_receiver: Receiver) -> None:
    n = SystemdNotifier({"NOTIFY_SOCKET": fs_receiver.env_value})
    _run_until_calls(n, [True, False, False, True, True], interval=0.01)
    assert _pings(fs_receiver) == 3


def test_watchdog_loop_async_errors_and_hangs_count_as_unhealthy(fs_receiver: Receiver) -> None:
    n = SystemdNotifier({"NOTIFY_SOCKET": fs_receiver.env_value})
    answers: list[object] = ["async:True", RuntimeError("check broke"), "hang", "async:False", "async:True"]
    _run_until_calls(n, answers, interval=0.02)
    assert _pings(fs_receiver) == 2


def test_watchdog_loop_returns_without_watchdog() -> None:
    called = False

    def healthy() -> bool:
        nonlocal called
        called = True
        return True

    asyncio.run(asyncio.wait_for(watchdog_loop(SystemdNotifier({}), healthy), timeout=5))
    assert not called
