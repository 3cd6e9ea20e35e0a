"""tools/vrm-sim (the reference VRM) as a child process, and the agent's own view of its VRM link.

Why here: the VRM link e2e tests (plain and mutual TLS) run the same simulator process, read its
SQLite store and ask the agent's GetVrmStatus.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from cna_agent.api import pb
from support.tools import TOOLS
from support.waiting import wait_for

VRM_SIM = TOOLS / "vrm-sim"


class SimProcess:
    """tools/vrm-sim serve as a child process on a fixed port and store."""

    def __init__(self, base: Path, port: int, db: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.base, self.port, self.db = base, port, db
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = self.base / f"vrm-sim.{self.starts}.log"
        self.log = log
        self.proc = subprocess.Popen([sys.executable, str(VRM_SIM), "serve", "--listen", f"127.0.0.1:{self.port}",
                                      "--db", str(self.db), "--verbose", *self.extra_args],
                                     stdout=log.open("wb"), stderr=subprocess.STDOUT)
        wait_for(lambda: "listening" in log.read_text(), 30, f"vrm-sim listening ({log})")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        db = sqlite3.connect(self.db, timeout=10)
        try:
            return db.execute(sql, params).fetchall()
        except sqlite3.OperationalError:
            return []  # not created yet
        finally:
            db.close()

    def cli(self, *args: str) -> str:
        out = subprocess.run([sys.executable, str(VRM_SIM), *args, "--db", str(self.db)] if args[0] != "call"
                             else [sys.executable, str(VRM_SIM), "call", "--db", str(self.db), *args[1:]],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout


def vrm_status(agent) -> pb.agent_pb2.VrmLinkStatus:
    with agent.channel() as ch:
        return pb.agent_pb2_grpc.AgentServiceStub(ch).GetVrmStatus(pb.agent_pb2.GetVrmStatusRequest(), timeout=10)
