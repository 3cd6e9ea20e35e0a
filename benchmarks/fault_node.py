"""The node the fault suite breaks (benchmarks/faults.py): one agent home that lives through every
point, and what an observer outside the agent counts on it (files, domain definitions, run
directories, QEMU processes, libvirt secrets, the event log)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from cna_agent.api import pb
from support.agent import AgentProcess, start_agent
from support.guests import build_guest
from support.procs import proc_argvs

vm, S, O, E = pb.vm_pb2, pb.storage_pb2, pb.operations_pb2, pb.events_pb2
NEIGHBOUR = "fneighbour"
#: The tmpfs datastore that fills up (datastore-full points): smaller than what is written to it.
SMALL_MIB = 24


class Node:
    """One agent home; ``mode`` "embedded" (the agent's own libvirt, for agent kills) or
    "system" (the host's libvirtd, which the libvirtd points kill)."""

    def __init__(self, base: Path, mode: str = "embedded", *, extra: str = "",
                 observers: dict[str, Callable[[], set[str]]] | None = None) -> None:
        """``extra``: more agent config (fault_deps.py's SAN datastore and switch database);
        ``observers``: more things to count leaks of, by name (OVS bridges, iSCSI sessions)."""
        self.base, self.mode = base, mode
        self.observers = observers or {}
        self.home = base / "agent"
        for d in (base / "ds", base / "imp", base / "small"):
            d.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_MIB}m,mode=0755", "cnafaults", str(base / "small")],
                       check=True, timeout=30)
        guest_dir = Path(build_guest("x86_64")["kernel"]).parent
        self.extra = (f'[compute]\nimage_dirs = "{guest_dir}"\n'
                      f'[storage.datastores.ds]\ntype = "dir"\npath = "{base / "ds"}"\n'
                      f'[storage.datastores.imp]\ntype = "dir"\npath = "{base / "imp"}"\n'
                      f'[storage.datastores.small]\ntype = "dir"\npath = "{base / "small"}"\n' + extra)
        self.agent: AgentProcess | None = None
        self.ready_after_kill: list[float] = []
        self.ready_after_stop: list[float] = []
        if mode == "system":
            self.etc, self.run = Path("/etc/libvirt/qemu"), Path("/run/libvirt/qemu")
        else:
            root = self.home / "state" / "libvirt"
            self.etc, self.run = root / "etc" / "qemu", root / "run" / "qemu"

    def start(self, failpoint: str = "", *, after_kill: bool = False) -> AgentProcess:
        t0 = time.monotonic()
        env = {"CNA_FAILPOINTS": failpoint} if failpoint else {}
        config = self.home / "agent.toml" if (self.home / "agent.toml").exists() else None
        self.agent = start_agent(self.home, None, tcp=False, extra_config=self.extra, config=config, env=env, mode=self.mode)
        (self.ready_after_kill if after_kill else self.ready_after_stop).append(time.monotonic() - t0)
        return self.agent

    def stop(self) -> None:
        if self.agent is not None and self.agent.proc.poll() is None:
            self.agent.stop(signal.SIGTERM)
        self.agent = None

    def close(self) -> None:
        """Stop the agent and take away what a run cut short by an error may have left: its
        guests' QEMU processes, the suite's Linux bridges, the tmpfs."""
        self.stop()
        for pid in qemu_of(self.home).values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for link in Path("/sys/class/net").glob("cnaf*"):
            subprocess.run(["ip", "link", "del", link.name], capture_output=True, timeout=30)
        subprocess.run(["umount", "-l", str(self.base / "small")], capture_output=True, timeout=30)


# -- what an outside observer counts ----------------------------------------------------------------


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()} if d.exists() else set()


def qemu_of(marker: Path) -> dict[str, int]:
    """uuid -> pid of every QEMU whose argv names ``marker`` (the agent home: its serial logs
    and side-channel sockets live there)."""
    found = {}
    for pid, argv in proc_argvs():
        if b"qemu-system" in argv[0] and any(str(marker).encode() in a for a in argv):
            for i, a in enumerate(argv):
                if a == b"-uuid" and i + 1 < len(argv):
                    found[argv[i + 1].decode()] = pid
    return found


def inventory(node: Node) -> dict[str, set[str]]:
    """Everything left on the node that a point could leak."""
    ours = {p.name for p in node.etc.glob("*.xml") if str(node.home) in p.read_text(errors="replace")}
    secrets = node.home / "state" / "libvirt" / "etc" / "secrets"
    return {"files": {f"{d}/{f}" for d in ("ds", "imp", "small") for f in _files(node.base / d)},
            "domains": ours,
            "run_dirs": {p.name for p in (node.home / "run" / "vms").glob("*")},
            "qemu": set(qemu_of(node.home)),
            "bridges": {p.name for p in Path("/sys/class/net").glob("cnaf*")},
            "secrets": _files(secrets) if node.mode == "embedded" else set(),
            "claims": placement_claims(node.home),
            **{name: see() for name, see in node.observers.items()}}


def placement_claims(home: Path) -> set[str]:
    """VMs holding a placement claim (CPU/NUMA) in the agent's state database, read from the
    SQLite file itself (read-only), not asked of the agent."""
    db = home / "state" / "agent.db"
    if not db.exists():
        return set()
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return {row[0] for row in conn.execute("SELECT vm_uuid FROM placements")}
    except sqlite3.OperationalError:  # not created yet
        return set()
    finally:
        conn.close()


def leaks(node: Node, baseline: dict[str, set[str]]) -> list[str]:
    now = inventory(node)
    return [f"{k}: {sorted(now[k] - baseline[k])}" for k in now if now[k] - baseline[k]]


def wait(channel: Any, op: Any, timeout: float = 120) -> Any:
    from support.operations import wait as wait_done

    return wait_done(channel, op, timeout)


def all_volumes(channel: Any) -> list[Any]:
    stub = pb.storage_pb2_grpc.StorageServiceStub(channel)
    return [v for ds in ("ds", "imp", "small") for v in stub.ListVolumes(S.ListVolumesRequest(datastore=ds), timeout=30).volumes]


def clean_up(channel: Any, baseline_volumes: set[str]) -> list[str]:
    """Delete through the API every VM but the neighbour and every volume made since the start;
    what fails to delete is named (it counts as a leak)."""
    vms, storage = pb.vm_pb2_grpc.VmServiceStub(channel), pb.storage_pb2_grpc.StorageServiceStub(channel)
    problems = []
    for v in vms.ListVms(vm.ListVmsRequest(), timeout=30).vms:
        if v.spec.name == NEIGHBOUR:
            continue
        done = wait(channel, vms.DeleteVm(vm.DeleteVmRequest(vm=v.uuid, force=True), timeout=60))
        if done.state != O.OPERATION_STATE_SUCCEEDED:
            problems.append(f"vm {v.spec.name}: delete {done.error.message}")
    net = pb.network_pb2_grpc.NetworkServiceStub(channel)
    N = pb.network_pb2
    for pg in net.ListPortGroups(N.ListPortGroupsRequest(), timeout=30).port_groups:
        done = wait(channel, net.DeletePortGroup(N.DeletePortGroupRequest(name=pg.name), timeout=60))
        if done.state != O.OPERATION_STATE_SUCCEEDED:
            problems.append(f"port group {pg.name}: delete {done.error.message}")
    for br in net.ListBridges(N.ListBridgesRequest(), timeout=30).bridges:
        done = wait(channel, net.DeleteBridge(N.DeleteBridgeRequest(name=br.name), timeout=60))
        if done.state != O.OPERATION_STATE_SUCCEEDED:
            problems.append(f"bridge {br.name}: delete {done.error.message}")
    # Overlays before what they stand on (a snapshot's overlay makes its disk a template): a
    # volume refused while another went is tried again in the next pass.
    left: list[str] = []
    for _ in range(5):
        left = []
        for vol in all_volumes(channel):
            if vol.id in baseline_volumes:
                continue
            done = wait(channel, storage.DeleteVolume(S.DeleteVolumeRequest(id=vol.id), timeout=60))
            if done.state != O.OPERATION_STATE_SUCCEEDED:
                left.append(f"volume {vol.id}: delete {done.error.message}")
        if not left:
            break
    return problems + left


def operation(channel: Any, kind: str, request_id: str) -> Any:
    """The operation the request with ``request_id`` opened, as the agent lists it now."""
    ops = pb.operations_pb2_grpc.OperationsServiceStub(channel)
    listed = ops.ListOperations(O.ListOperationsRequest(kinds=[kind], page_size=50), timeout=30).operations
    return next((o for o in listed if o.request_id == request_id), None)


def truth(op: Any, effect: bool) -> str:
    """Why the operation's outcome is untrue ("" when it is true)."""
    if op is None:
        return "no operation recorded for the request"
    if not op.done:
        return "left running"
    if (op.state == O.OPERATION_STATE_SUCCEEDED) != effect:
        return f"{O.OperationState.Name(op.state)} while the effect is {'there' if effect else 'absent'}"
    return ""


def neighbour_lost(node: Node, neighbour: tuple[str, int], status: str) -> str:
    uuid, pid = neighbour
    now = qemu_of(node.home).get(uuid)
    if now != pid or status != "running":
        return f"neighbour pid {pid} -> {now}, state {status or 'not running'}"
    return ""


def event_problems(channel: Any) -> list[str]:
    """Holes or repeats in the event log, and operations announced done more than once."""
    events = pb.events_pb2_grpc.EventServiceStub(channel)
    seen: list[Any] = []
    after = 0
    while True:
        r = events.ListEvents(E.ListEventsRequest(after_sequence=after, limit=1000), timeout=30)
        seen += list(r.events)
        if not r.events or r.events[-1].sequence >= r.last_sequence:
            break
        after = r.events[-1].sequence
    problems = []
    seqs = [e.sequence for e in seen]
    for a, b in zip(seqs, seqs[1:]):
        if b != a + 1:
            problems.append(f"sequence {a} then {b}")
    done: dict[str, int] = {}
    for e in seen:
        if e.type == "operation.done":
            done[e.resource_id] = done.get(e.resource_id, 0) + 1
    problems += [f"operation {k} done {n} times" for k, n in done.items() if n > 1]
    return problems
