"""Following a long operation on the terminal: one progress line, redrawn in place on a tty, and
the final Operation for the command's summary.

Why one module: migration, evacuation, volume import and copy all report the same AIP-151
progress (percent, stage, bytes done/total), so every command follows them the same way.
The bar goes to stderr so ``--json`` or a summary on stdout stays clean for scripts; when
stderr is not a terminal it prints a plain line at each stage change or 10 % step instead of
carriage-return redraws.

Ctrl-C while following does not silently abandon the operation (it runs on in the agent): on a
terminal the admin is asked whether to cancel it, and either way told what became of it
(:func:`on_interrupt`); the command then exits 130, as an interrupted command does.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator, TextIO

import grpc

from cna_agent.api import pb
from cna_agent.cli.table import human_bytes

WIDTH = 24
#: Seconds of samples the transfer rate is averaged over.
RATE_WINDOW_S = 5.0


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLine:
    """Renders an operation's progress; keeps the byte samples the rate is computed from."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque()

    def rate(self, bytes_done: int) -> float | None:
        """Bytes per second over the last RATE_WINDOW_S, or None before two samples differ."""
        now = self._clock()
        if not self._samples or bytes_done != self._samples[-1][1]:
            self._samples.append((now, bytes_done))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW_S:
            self._samples.popleft()
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        if t1 <= t0 or b1 <= b0:
            return None
        return (b1 - b0) / (t1 - t0)

    def render(self, percent: int, stage: str, bytes_done: int = 0, bytes_total: int = 0) -> str:
        pct = max(0, min(100, percent))
        filled = WIDTH * pct // 100
        parts = [f"[{'#' * filled}{'.' * (WIDTH - filled)}] {pct:>3}%"]
        if bytes_total:
            parts.append(f"{human_bytes(bytes_done)}/{human_bytes(bytes_total)}")
            rate = self.rate(bytes_done)
            if rate:
                parts.append(f"{human_bytes(rate)}/s")
                if bytes_total > bytes_done:
                    parts.append(f"~{fmt_duration((bytes_total - bytes_done) / rate)} left")
        if stage:
            parts.append(stage)
        return " ".join(parts)


#: The exit code of a command interrupted by Ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130


def _ask_on_terminal(question: str) -> bool | None:
    """The admin's yes/no on the controlling terminal; None when there is none to ask on."""
    if not sys.stdin.isatty():
        return None
    try:
        return input(question).strip().lower() in ("y", "yes")
    except (EOFError, KeyboardInterrupt):
        return False


def interrupted(client: Any, op: Any, ask: Callable[[str], bool | None] = _ask_on_terminal) -> str:
    """What to say after Ctrl-C while following ``op``: cancelled (the agent's answer, a refusal
    included, in its words), or left running with the command that follows it again."""
    again = f"follow it with: cna-ctl ops show -w {op.id}"
    answer = ask(f"\nCancel {op.kind} {op.id}? [y/N] ")  # fits 80 columns; "no" leaves it running
    if not answer:
        return f"interrupted; operation {op.id} ({op.kind}) keeps running in the agent; {again}"
    from cna_agent.cli.common import CliError

    try:
        cur = client.call(client.ops.CancelOperation, pb.operations_pb2.CancelOperationRequest(id=op.id), timeout=60)
    except CliError as exc:
        return f"operation {op.id} ({op.kind}) was not cancelled: {exc}; {again}"
    state = pb.operations_pb2.OperationState.Name(cur.state).removeprefix("OPERATION_STATE_").lower()
    if cur.done:
        return f"operation {op.id} ({op.kind}) {state}"
    return f"cancel asked; operation {op.id} ({op.kind}) is still winding down ({state}); {again}"


@contextlib.contextmanager
def on_interrupt(client: Any, op: Any, ask: Callable[[str], bool | None] = _ask_on_terminal) -> Iterator[None]:
    """Around a watch of ``op``: Ctrl-C offers to cancel it, then ends the command (exit 130)."""
    try:
        yield
    except KeyboardInterrupt:
        from cna_agent.cli.common import CliError

        raise CliError(interrupted(client, op, ask), EXIT_INTERRUPTED) from None


def follow(client: Any, op: Any, *, out: TextIO | None = None, tty: bool | None = None) -> Any:
    """Watch ``op`` until it is done, drawing its progress on ``out`` (stderr); returns the last
    Operation seen. The watch stream is the runner's own (each change, no polling)."""
    out = out if out is not None else sys.stderr
    tty = out.isatty() if tty is None else tty
    line = ProgressLine()
    last, shown = op, (-100, "")
    drawn = False

    def draw(o: Any) -> None:
        nonlocal shown, drawn
        p = o.progress
        text = line.render(p.percent, p.stage, p.bytes_done, p.bytes_total)
        if tty:
            out.write("\r" + text[:160].ljust(100))
            drawn = True
        elif p.stage != shown[1] or p.percent >= shown[0] + 10 or (o.done and p.percent != shown[0]):
            out.write(text + "\n")
            shown = (p.percent, p.stage)
        out.flush()

    try:
        if op.done:  # the agent waited for a quick one: show where it ended all the same
            draw(op)
            return op
        stream: Iterable[Any] = client.ops.WatchOperation(pb.operations_pb2.WatchOperationRequest(id=op.id))
        with on_interrupt(client, op):
            for cur in stream:
                last = cur
                draw(cur)
    except grpc.RpcError as exc:
        from cna_agent.cli.common import rpc_error

        raise rpc_error(exc, client.socket_path) from None
    finally:
        if drawn:
            out.write("\n")
            out.flush()
    return last


def elapsed_s(op: Any) -> float:
    """Seconds from the operation's creation to its end (or its last update)."""
    end = op.end_time if op.HasField("end_time") else op.update_time
    return max(0.0, (end.seconds + end.nanos / 1e9) - (op.create_time.seconds + op.create_time.nanos / 1e9))


def watched(client: Any, args: Any, op: Any, summary: Callable[[Any], str]) -> str:
    """The tail of every long command (migrate, hibernate, move-disk): follow ``op`` with the
    progress bar unless ``--no-wait``, then print it as JSON (``--json``), say it is still
    running, or give ``summary(op)``; a failed operation is a CliError with that summary."""
    import json

    from cna_agent.cli.common import CliError, to_json

    if args.wait:
        op = follow(client, op)
    if args.json:
        out = json.dumps(to_json(op), indent=2)
    elif not op.done:
        out = f"{op.kind} {op.id} started (follow it with: cna-ctl ops show --watch {op.id})"
    else:
        out = summary(op)
    if op.HasField("error"):
        if args.json:
            print(out)
        raise CliError(summary(op))
    return out
