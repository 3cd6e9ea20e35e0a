"""``cna-ctl vm console NAME``: the VM's serial console on this terminal.

On a tty: raw mode, Ctrl-] detaches, the terminal settings are restored on every exit path.
With a non-tty stdin (scripts): stdin is sent as typed, and after its end the output keeps
flowing for ``--linger`` seconds so the guest's answer is printed before the stream closes.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import termios
import threading
import time
import tty
from typing import Iterator

import grpc

from cna_agent.api import pb
from cna_agent.cli.common import Client, rpc_error

ESCAPE = b"\x1d"  # Ctrl-]
_STOP = object()


def _inputs(first: object, q: "queue.Queue[object]") -> Iterator[object]:
    yield first
    while True:
        item = q.get()
        if item is _STOP:
            return
        yield item


def _read_stdin(fd: int, q: "queue.Queue[object]", interactive: bool, done: threading.Event, linger: float) -> None:
    while not done.is_set():
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            time.sleep(linger)
            break
        if interactive and ESCAPE in data:
            before = data.split(ESCAPE, 1)[0]
            if before:
                q.put(pb.vm_pb2.SerialConsoleInput(data=before))
            break
        q.put(pb.vm_pb2.SerialConsoleInput(data=data))
    q.put(_STOP)


def cmd_console(client: Client, args: argparse.Namespace) -> None:
    fd = sys.stdin.fileno()
    interactive = os.isatty(fd)
    q: "queue.Queue[object]" = queue.Queue()
    done = threading.Event()
    call = client.vms.SerialConsole(_inputs(pb.vm_pb2.SerialConsoleInput(vm=args.vm, force=args.force), q))
    saved = termios.tcgetattr(fd) if interactive else None
    if interactive:
        sys.stderr.write(f"Connected to the serial console of {args.vm} (Ctrl-] detaches)\r\n")
        sys.stderr.flush()
        tty.setraw(fd)
    reader = threading.Thread(target=_read_stdin, args=(fd, q, interactive, done, args.linger), daemon=True)
    reader.start()
    out = sys.stdout.buffer
    try:
        try:
            for msg in call:
                out.write(msg.data)
                out.flush()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise rpc_error(exc, client.socket_path) from None
    except KeyboardInterrupt:
        call.cancel()
    finally:
        done.set()
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
            sys.stderr.write("\r\nDetached.\n")
    return None


def register_console(vms: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = vms.add_parser("console", parents=[common], help="attach this terminal to a VM's serial console (Ctrl-] detaches)")
    p.add_argument("vm", help="name or UUID")
    p.add_argument("--force", action="store_true", help="take the console over from another session")
    p.add_argument("--linger", type=float, default=2.0,
                   help="seconds to keep printing output after a non-tty stdin ends (default 2)")
    p.set_defaults(func=cmd_console)
