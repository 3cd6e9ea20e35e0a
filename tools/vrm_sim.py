#!/usr/bin/env python3
"""vrm-sim: a small reference VRM for tests and demos (a test tool, not a product).

It implements cna.v1.VrmService: agents register (several at once), stream heartbeats and
event batches, and get cumulative acks. Everything lands in one SQLite file, so the simulator
can be killed and restarted on the same store (it then tells each agent the last sequence it
holds, and the agent resumes after it), or started on a fresh store (it reports 0 and receives
the whole log again). Events are stored once per (host, event log, sequence); duplicates are
counted. A host whose agent comes back with a new event log (state directory wiped) starts a
new resume point instead of inheriting the old log's acks.

    vrm-sim serve --listen 127.0.0.1:7800 --db /tmp/vrm.db [--cert --key --ca] [--no-resume-point]
    vrm-sim hosts  --db /tmp/vrm.db [--json]        hosts, their last heartbeat and backlog
    vrm-sim vms    --db /tmp/vrm.db [--json]        VMs from the latest heartbeats
    vrm-sim events --db /tmp/vrm.db [--host UUID] [--json]
    vrm-sim call   --db /tmp/vrm.db HOST caps|vms|start|shutdown|pause|resume [VM]
                                                    the node API at the endpoint HOST registered

Plaintext on loopback by default; ``--cert/--key`` serve TLS and ``--ca`` requires client
certificates (mutual TLS), as a production VRM would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sqlite3
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from cna_agent.api import pb

SCHEMA = """
CREATE TABLE IF NOT EXISTS hosts (
    host_uuid TEXT PRIMARY KEY, hostname TEXT, agent_version TEXT, endpoint TEXT, session_id TEXT,
    registered_at REAL, connected INTEGER DEFAULT 0, last_heartbeat REAL, heartbeat TEXT,
    duplicates INTEGER DEFAULT 0, pruned_through INTEGER DEFAULT 0, registrations INTEGER DEFAULT 0,
    capabilities TEXT, event_log_id TEXT DEFAULT ''
);
CREATE TABLE IF NOT EXISTS events (
    host_uuid TEXT NOT NULL, sequence INTEGER NOT NULL, time REAL, type TEXT, severity INTEGER,
    resource_kind TEXT, resource_id TEXT, resource_name TEXT, message TEXT, attributes TEXT,
    received_at REAL, event_log_id TEXT NOT NULL DEFAULT '', PRIMARY KEY (host_uuid, event_log_id, sequence)
);
"""


def open_db(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=30)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    return db


def _json(msg: Any) -> str:
    return json.dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True))


class Store:
    """The simulator's memory: hosts and their de-duplicated events."""

    def __init__(self, path: str) -> None:
        self.db = open_db(path)

    def log_id(self, host: str) -> str:
        row = self.db.execute("SELECT event_log_id FROM hosts WHERE host_uuid = ?", (host,)).fetchone()
        return row["event_log_id"] if row else ""

    def last_acked(self, host: str) -> int:
        log_id = self.log_id(host)
        row = self.db.execute("SELECT MAX(sequence) AS s FROM events WHERE host_uuid = ? AND event_log_id = ?", (host, log_id)).fetchone()
        pruned = self.db.execute("SELECT pruned_through FROM hosts WHERE host_uuid = ?", (host,)).fetchone()
        return max(int(row["s"] or 0), int(pruned["pruned_through"] or 0) if pruned else 0)

    def register(self, req: Any, session: str) -> None:
        caps = _json(req.capabilities) if req.HasField("capabilities") else "{}"
        if self.log_id(req.host_uuid) not in ("", req.event_log_id):
            print(f"new-event-log host={req.host_uuid} old={self.log_id(req.host_uuid)} new={req.event_log_id}", flush=True)
            self.db.execute("UPDATE hosts SET pruned_through = 0 WHERE host_uuid = ?", (req.host_uuid,))
        self.db.execute(
            "INSERT INTO hosts(host_uuid, hostname, agent_version, endpoint, session_id, registered_at, registrations, capabilities,"
            " event_log_id) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?) ON CONFLICT(host_uuid) DO UPDATE SET hostname = excluded.hostname,"
            " agent_version = excluded.agent_version, endpoint = excluded.endpoint, session_id = excluded.session_id,"
            " registered_at = excluded.registered_at, registrations = registrations + 1, capabilities = excluded.capabilities,"
            " event_log_id = excluded.event_log_id",
            (req.host_uuid, req.hostname, req.agent_version, req.endpoint, session, time.time(), caps, req.event_log_id),
        )

    def store_events(self, host: str, batch: Any) -> tuple[int, int]:
        """Insert a batch; returns (new, duplicates)."""
        new = dup = 0
        log_id = self.log_id(host)
        self.db.execute("BEGIN")
        try:
            for ev in batch.events:
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (host, ev.sequence, ev.time.seconds + ev.time.nanos / 1e9, ev.type, ev.severity, ev.resource_kind,
                     ev.resource_id, ev.resource_name, ev.message, json.dumps(dict(ev.attributes)), time.time(), log_id),
                )
                if cur.rowcount:
                    new += 1
                else:
                    dup += 1
            if dup:
                self.db.execute("UPDATE hosts SET duplicates = duplicates + ? WHERE host_uuid = ?", (dup, host))
            if batch.pruned_through:
                self.db.execute("UPDATE hosts SET pruned_through = MAX(pruned_through, ?) WHERE host_uuid = ?",
                                (batch.pruned_through, host))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return new, dup

    def heartbeat(self, host: str, beat: Any) -> None:
        self.db.execute("UPDATE hosts SET last_heartbeat = ?, heartbeat = ? WHERE host_uuid = ?", (time.time(), _json(beat), host))

    def set_connected(self, host: str, connected: bool) -> None:
        self.db.execute("UPDATE hosts SET connected = ? WHERE host_uuid = ?", (int(connected), host))


class VrmSim(pb.vrm_pb2_grpc.VrmServiceServicer):
    def __init__(self, store: Store, *, report_resume_point: bool = True, heartbeat_interval: float = 0.0,
                 verbose: bool = False) -> None:
        self.store = store
        self.report_resume_point = report_resume_point
        self.heartbeat_interval = heartbeat_interval
        self.verbose = verbose
        self.sessions: dict[str, str] = {}  # session id -> host uuid

    async def Register(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not request.host_uuid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "host_uuid: required")
        session = uuid.uuid4().hex
        self.sessions[session] = request.host_uuid
        self.store.register(request, session)
        reply = pb.vrm_pb2.RegisterResponse(session_id=session, heartbeat_interval_seconds=self.heartbeat_interval)
        if self.report_resume_point:
            reply.last_acked_sequence = self.store.last_acked(request.host_uuid)
        print(f"register host={request.host_uuid} hostname={request.hostname} endpoint={request.endpoint} "
              f"agent_last={request.last_sequence} resume_after={reply.last_acked_sequence if reply.HasField('last_acked_sequence') else '-'}",
              flush=True)
        return reply

    async def Connect(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        session = dict(context.invocation_metadata()).get("x-cna-session", "")
        host = self.sessions.get(session)
        if host is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "unknown session: Register first")
        self.store.set_connected(host, True)
        try:
            async for msg in request_iterator:
                which = msg.WhichOneof("payload")
                if which == "events":
                    new, dup = self.store.store_events(host, msg.events)
                    if self.verbose:
                        for ev in msg.events.events:
                            print(f"event host={host} seq={ev.sequence} type={ev.type} {ev.resource_name} {ev.message}", flush=True)
                    if dup:
                        print(f"duplicates host={host} count={dup}", flush=True)
                elif which == "heartbeat":
                    self.store.heartbeat(host, msg.heartbeat)
                    if self.verbose:
                        hb = msg.heartbeat
                        print(f"heartbeat host={host} cpu={hb.host.cpu.percent:.1f}% vms={len(hb.vms)} backlog={hb.backlog}", flush=True)
                # Answer every message: the agent treats silence as a dead VRM.
                yield pb.vrm_pb2.VrmMessage(ack=pb.vrm_pb2.Ack(sequence=self.store.last_acked(host)))
        finally:
            if self.sessions.get(session) == host:
                self.store.set_connected(host, False)


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


async def serve(args: argparse.Namespace) -> int:
    store = Store(args.db)
    sim = VrmSim(store, report_resume_point=not args.no_resume_point, heartbeat_interval=args.heartbeat_interval,
                 verbose=args.verbose)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb.vrm_pb2_grpc.add_VrmServiceServicer_to_server(sim, server)
    if args.cert:
        creds = grpc.ssl_server_credentials([(_read(args.key), _read(args.cert))], root_certificates=_read(args.ca),
                                            require_client_auth=bool(args.ca))
        port = server.add_secure_port(args.listen, creds)
    else:
        port = server.add_insecure_port(args.listen)
    if not port:
        print(f"vrm-sim: cannot listen on {args.listen}", file=sys.stderr)
        return 1
    await server.start()
    print(f"listening {args.listen.rsplit(':', 1)[0]}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)
    return 0


def _rows(db: sqlite3.Connection, sql: str, params: tuple = ()) -> list[dict]:
    return [dict(r) for r in db.execute(sql, params).fetchall()]


def cmd_hosts(args: argparse.Namespace) -> int:
    db = open_db(args.db)
    hosts = _rows(db, "SELECT host_uuid, hostname, agent_version, endpoint, connected, registrations, last_heartbeat,"
                      " duplicates, pruned_through, heartbeat FROM hosts ORDER BY hostname")
    for h in hosts:
        beat = json.loads(h.pop("heartbeat") or "{}")
        h["backlog"] = int(beat.get("backlog", 0))
        h["vms"] = len(beat.get("vms", []))
        h["events"] = db.execute("SELECT COUNT(*) FROM events WHERE host_uuid = ?", (h["host_uuid"],)).fetchone()[0]
        h["last_sequence"] = int(beat.get("last_sequence", 0))
    if args.json:
        print(json.dumps(hosts, indent=2))
    else:
        print(f"{'HOST':36}  {'HOSTNAME':16} {'ENDPOINT':22} {'UP':3} {'VMS':>4} {'EVENTS':>7} {'BACKLOG':>7} {'DUPS':>5}")
        for h in hosts:
            print(f"{h['host_uuid']:36}  {h['hostname'][:16]:16} {h['endpoint'][:22]:22} {'yes' if h['connected'] else 'no':3} "
                  f"{h['vms']:>4} {h['events']:>7} {h['backlog']:>7} {h['duplicates']:>5}")
    return 0


def cmd_vms(args: argparse.Namespace) -> int:
    db = open_db(args.db)
    out = []
    for h in _rows(db, "SELECT host_uuid, hostname, heartbeat FROM hosts"):
        for vm in json.loads(h["heartbeat"] or "{}").get("vms", []):
            out.append({"host_uuid": h["host_uuid"], "hostname": h["hostname"], **vm})
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{'HOSTNAME':16} {'VM':24} {'STATE':20} {'CPU%':>6}")
        for vm in out:
            print(f"{vm['hostname'][:16]:16} {vm.get('name', '')[:24]:24} {vm.get('state', ''):20} {vm.get('cpu_percent', 0):>6.1f}")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    db = open_db(args.db)
    sql, params = "SELECT * FROM events", ()
    if args.host:
        sql, params = sql + " WHERE host_uuid = ?", (args.host,)
    events = _rows(db, sql + " ORDER BY host_uuid, sequence", params)
    for e in events:
        e["attributes"] = json.loads(e["attributes"] or "{}")
    if args.json:
        print(json.dumps(events, indent=2))
    else:
        for e in events:
            print(f"{e['host_uuid'][:8]} {e['sequence']:>7} {e['type']:24} {e['resource_name'][:20]:20} {e['message']}")
    return 0


def cmd_call(args: argparse.Namespace) -> int:
    db = open_db(args.db)
    row = db.execute("SELECT endpoint FROM hosts WHERE host_uuid = ? OR hostname = ?", (args.host, args.host)).fetchone()
    if row is None or not row["endpoint"]:
        print(f"vrm-sim: host {args.host!r} is not registered (or registered no endpoint)", file=sys.stderr)
        return 1
    if args.cert or args.ca:
        creds = grpc.ssl_channel_credentials(root_certificates=_read(args.ca), private_key=_read(args.key), certificate_chain=_read(args.cert))
        channel = grpc.secure_channel(row["endpoint"], creds)
    else:
        channel = grpc.insecure_channel(row["endpoint"])
    with channel:
        if args.action == "caps":
            reply = pb.host_pb2_grpc.HostServiceStub(channel).GetCapabilities(pb.host_pb2.GetCapabilitiesRequest(), timeout=30)
        elif args.action == "vms":
            reply = pb.vm_pb2_grpc.VmServiceStub(channel).ListVms(pb.vm_pb2.ListVmsRequest(), timeout=30)
        else:
            if not args.vm:
                print(f"vrm-sim: {args.action} needs a VM name or UUID", file=sys.stderr)
                return 2
            stub = pb.vm_pb2_grpc.VmServiceStub(channel)
            if args.action == "shutdown":
                op = stub.ShutdownVm(pb.vm_pb2.ShutdownVmRequest(vm=args.vm, hard=args.hard), timeout=30)
            else:
                method = {"start": stub.StartVm, "pause": stub.PauseVm, "resume": stub.ResumeVm}[args.action]
                op = method(pb.vm_pb2.VmActionRequest(vm=args.vm), timeout=30)
            ops = pb.operations_pb2_grpc.OperationsServiceStub(channel)
            for reply in ops.WatchOperation(pb.operations_pb2.WatchOperationRequest(id=op.id), timeout=300):
                pass
    print(json.dumps(json_format.MessageToDict(reply, preserving_proto_field_name=True), indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vrm-sim", description="A small reference VRM for cna-agent tests and demos.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the VRM gRPC service")
    s.add_argument("--listen", default="127.0.0.1:7800")
    s.add_argument("--db", required=True, help="SQLite store (kept across restarts)")
    s.add_argument("--cert")
    s.add_argument("--key")
    s.add_argument("--ca", help="require client certificates signed by this CA (mutual TLS)")
    s.add_argument("--no-resume-point", action="store_true", help="do not tell agents the last sequence held")
    s.add_argument("--heartbeat-interval", type=float, default=0.0, help="seconds between heartbeats asked of agents")
    s.add_argument("--verbose", "-v", action="store_true")
    for name, fn in (("hosts", cmd_hosts), ("vms", cmd_vms), ("events", cmd_events)):
        c = sub.add_parser(name)
        c.add_argument("--db", required=True)
        c.add_argument("--json", action="store_true")
        if name == "events":
            c.add_argument("--host", default="")
        c.set_defaults(func=fn)
    c = sub.add_parser("call", help="call a registered agent's node API")
    c.add_argument("--db", required=True)
    c.add_argument("host", help="host UUID or hostname")
    c.add_argument("action", choices=("caps", "vms", "start", "shutdown", "pause", "resume"))
    c.add_argument("vm", nargs="?", default="")
    c.add_argument("--hard", action="store_true", help="shutdown: power off at once")
    c.add_argument("--cert")
    c.add_argument("--key")
    c.add_argument("--ca")
    c.set_defaults(func=cmd_call)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.cmd == "serve":
        try:
            return asyncio.run(serve(args))
        except KeyboardInterrupt:
            return 130
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
