"""Live migration through the agent vs ``virsh migrate --live --p2p``, and a fast-dirtying guest.

Why: MigrateVm adds the destination agent's preparation (placement, its own definition), the
job monitor, the finish call and the clean-up around libvirt's peer-to-peer job; this measures
what that costs against virsh driving the same job between the same two libvirt hosts
(target: ratio <= 1.10), and whether the guest's pause at the switch-over stays as short
(target for an idle guest: downtime <= 1.5x virsh's and <= 300 ms).

* Two libvirt hosts on this machine (tools/testbed.py ``hosts``, via tests/support/hosts.py) and
  one agent on each, brought up and torn down here.
* Two identical idle 256 MiB busybox guests running on host A: one created through agent A, the
  other defined directly on libvirt from the agent guest's own definition (the agent's metadata
  and its QMP side channel removed, its own name and serial log), so both move the same RAM
  and devices.
* Each run moves both guests once, in the run's direction (A->B, then B->A, ...), the order of
  the two alternating every other run so machine noise hits both. agent_ms: MigrateVm called
  until its operation is done (WatchOperation ends). virsh_ms: the wall time of
  ``virsh -c SRC migrate --live --p2p --persistent --undefinesource --abort-on-error NAME DST
  tcp://127.0.0.1`` (the flags the agent uses, the same kind of migration URI). Downtimes are
  QEMU's (the completed job's ``downtime``): the agent's from its vm.migrated event, virsh's
  from libvirt's completed job stats on the destination (``domjobinfo --completed``). Medians.
  One untimed round trip of each warms both hosts first.
* dirty_converged: the e2e convergence check (tests/support/dirty.py) once, on the agent's
  guest after the runs: a plain pre-copy of a guest rewriting 64 MiB at 32 MiB/s times out and
  leaves it where it was; the default policy moves it.

Usage: python -m benchmarks.migration [--runs N] [--no-dirty]; needs root; the last line is
one JSON object.
"""

from __future__ import annotations

import cna_agent  # noqa: F401  (first: turns gRPC fork support off before grpc loads)

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the test support: hosts, agents, guests, the dirtying guest

from cna_agent.api import pb  # noqa: E402
from support.agent import AgentProcess, start_agent  # noqa: E402
from support.dirty import check_convergence, completed_job  # noqa: E402
from support.guests import guest_spec, serial_log  # noqa: E402
from support.console import SerialLog  # noqa: E402
from support.hosts import Host, agent_config, domain_state, remove_domains, start_two_hosts, stop_two_hosts  # noqa: E402

vm = pb.vm_pb2
ops_pb = pb.operations_pb2
MEMORY_MIB = 256


def wait_op(ch, op):
    """The operation once done (WatchOperation), failing on an error."""
    if not op.done:
        for op in pb.operations_pb2_grpc.OperationsServiceStub(ch).WatchOperation(
                ops_pb.WatchOperationRequest(id=op.id), timeout=600):
            pass
    if op.HasField("error"):
        raise RuntimeError(f"{op.kind} failed: {op.error.message}")
    return op


def virsh_twin_xml(agent_xml: str, uuid: str, name: str, log: Path) -> str:
    """The agent guest's definition as a plain libvirt guest: without the agent's metadata (the
    agents would adopt it) and its QMP side channel (a socket under the agent's run directory),
    with its own name, a new UUID and its own serial log."""
    xml = re.sub(r"<metadata\b.*?</metadata>", "", agent_xml, flags=re.S)
    xml = re.sub(r"<qemu:commandline>.*?</qemu:commandline>", "", xml, flags=re.S)
    xml = re.sub(r"<uuid>[^<]*</uuid>", "", xml, count=1)
    xml = re.sub(r"<name>[^<]*</name>", f"<name>{name}</name>", xml, count=1)
    xml = re.sub(r"(<log file=['\"])[^'\"]*(['\"])", rf"\g<1>{log}\g<2>", xml)
    if uuid in xml:
        raise RuntimeError(f"the agent guest's definition still names its UUID after the rewrite:\n{xml}")
    return xml


def agent_once(src: AgentProcess, dst: AgentProcess, uuid: str) -> tuple[float, dict]:
    """One MigrateVm src -> dst: (ms until its operation is done, the vm.migrated attributes)."""
    with src.channel() as ch:
        events = pb.events_pb2_grpc.EventServiceStub(ch)
        after = events.ListEvents(pb.events_pb2.ListEventsRequest(types=["vm.migrated"]), timeout=30).last_sequence
        t = time.perf_counter()
        op = pb.vm_pb2_grpc.VmServiceStub(ch).MigrateVm(
            vm.MigrateVmRequest(vm=uuid, destination=f"127.0.0.1:{dst.tcp_port}"), timeout=60)
        op = wait_op(ch, op)
        ms = (time.perf_counter() - t) * 1000
        got = events.ListEvents(pb.events_pb2.ListEventsRequest(after_sequence=after, types=["vm.migrated"]), timeout=30)
        attrs = next((dict(e.attributes) for e in got.events if e.operation_id == op.id), {})
    return ms, attrs


def virsh_once(src: Host, dst: Host, name: str, uuid: str) -> tuple[float, dict]:
    """One ``virsh migrate --live --p2p`` src -> dst: (wall ms, the completed job on dst)."""
    cmd = ["virsh", "-q", "-c", src.uri, "migrate", "--live", "--p2p", "--persistent", "--undefinesource",
           "--abort-on-error", name, dst.uri, "tcp://127.0.0.1"]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    ms = (time.perf_counter() - t) * 1000
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr.strip()}")
    return ms, completed_job(dst.uri, uuid)


def moved(src: Host, dst: Host, uuid: str) -> None:
    """The guest is running and persistent on dst and gone from src (libvirt on each host)."""
    where = (domain_state(src.uri, uuid), domain_state(dst.uri, uuid))
    if where != (None, (True, True)):
        raise RuntimeError(f"guest {uuid} after the move: (source, destination) = {where}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-dirty", action="store_true", help="skip the fast-dirtying guest's convergence check")
    args = ap.parse_args()
    import libvirt

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    base = Path(tempfile.mkdtemp(prefix="cna-bench-mig-", dir="/tmp"))
    base.chmod(0o711)  # QEMU (libvirt-qemu) traverses it to the serial logs
    hosts = start_two_hosts(base / "hosts")
    agents: list[AgentProcess] = []
    agent_ms: list[float] = []
    virsh_ms: list[float] = []
    agent_down: list[float] = []
    virsh_down: list[float] = []
    agent_job: list[float] = []
    virsh_job: list[float] = []
    dirty = None
    try:
        guests = str(REPO / ".cache" / "guests")
        for name, host in (("a", hosts.a), ("b", hosts.b)):
            agents.append(start_agent(base / name, None, extra_config=agent_config(host, guests) + '[log]\nlevel = "warning"\n'))
        ag = {"a": agents[0], "b": agents[1]}
        hs = {"a": hosts.a, "b": hosts.b}
        with ag["a"].channel() as ch:
            created = wait_op(ch, pb.vm_pb2_grpc.VmServiceStub(ch).CreateVm(
                vm.CreateVmRequest(spec=guest_spec("x86_64", "bench-agent", memory_mib=MEMORY_MIB), start=True), timeout=60))
        agent_vm = vm.Vm()
        created.response.Unpack(agent_vm)
        auuid = agent_vm.uuid
        conn = hosts.a.open()
        try:
            agent_xml = conn.lookupByUUIDString(auuid).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
            twin = conn.defineXML(virsh_twin_xml(agent_xml, auuid, "bench-virsh", base / "virsh-serial.log"))
            twin.create()
            vuuid = twin.UUIDString()
        finally:
            conn.close()
        serial_log(ag["a"], auuid).wait_for(r"CNA-GUEST-READY boot=", timeout=150)
        SerialLog(base / "virsh-serial.log").wait_for(r"CNA-GUEST-READY boot=", timeout=150)

        for src, dst in (("a", "b"), ("b", "a")):  # warm-up round trip, untimed
            agent_once(ag[src], ag[dst], auuid)
            virsh_once(hs[src], hs[dst], "bench-virsh", vuuid)
        for i in range(args.runs):
            src, dst = ("a", "b") if i % 2 == 0 else ("b", "a")
            steps = ["agent", "virsh"] if (i // 2) % 2 == 0 else ["virsh", "agent"]
            for step in steps:
                if step == "agent":
                    ms, attrs = agent_once(ag[src], ag[dst], auuid)
                    moved(hs[src], hs[dst], auuid)
                    agent_ms.append(ms)
                    agent_down.append(float(attrs.get("downtime", "nan")))
                    agent_job.append(float(attrs.get("time_elapsed", "nan")))
                else:
                    ms, job = virsh_once(hs[src], hs[dst], "bench-virsh", vuuid)
                    moved(hs[src], hs[dst], vuuid)
                    virsh_ms.append(ms)
                    virsh_down.append(float(job.get("downtime", "nan")))
                    virsh_job.append(float(job.get("time_elapsed", "nan")))
            print(f"run {i + 1} {src}->{dst}: agent {agent_ms[-1]:.0f} ms (job {agent_job[-1]:.0f}, downtime "
                  f"{agent_down[-1]:.0f}), virsh {virsh_ms[-1]:.0f} ms (job {virsh_job[-1]:.0f}, downtime {virsh_down[-1]:.0f})",
                  flush=True)
        if not args.no_dirty:
            here = "a" if args.runs % 2 == 0 else "b"
            there = "b" if here == "a" else "a"
            dirty = check_convergence(ag[here], ag[there], hs[here], hs[there], auuid)
            print(f"dirtying guest ({dirty.rewrite_mib_s} MiB/s rewritten): plain pre-copy {dirty.plain_s} s "
                  f"-> {dirty.plain_error[1]!r}, {dirty.plain}; default policy {dirty.default_s} s, {dirty.default}, "
                  f"completed {dirty.completed}", flush=True)
    finally:
        for agent in agents:
            agent.stop()
        for host in (hosts.a, hosts.b):
            try:
                remove_domains(host.uri, str(base))
            except Exception as exc:  # the hosts go down next either way
                print(f"clean-up on host {host.name}: {exc}", file=sys.stderr)
        stop_two_hosts(hosts)
        shutil.rmtree(base, ignore_errors=True)
    med = statistics.median
    a, v = med(agent_ms), med(virsh_ms)
    print(f"{args.runs} interleaved runs, idle {MEMORY_MIB} MiB guest: agent median {a:.0f} ms (job {med(agent_job):.0f} ms, "
          f"downtime {med(agent_down):.0f} ms), virsh median {v:.0f} ms (job {med(virsh_job):.0f} ms, downtime "
          f"{med(virsh_down):.0f} ms) -> ratio {a / v:.3f}")
    out = {"agent_ms": round(a, 1), "virsh_ms": round(v, 1), "ratio": round(a / v, 3),
           "downtime_ms": med(agent_down), "virsh_downtime_ms": med(virsh_down),
           "agent_job_ms": med(agent_job), "virsh_job_ms": med(virsh_job),
           "dirty_converged": dirty.converged if dirty else None, "runs": args.runs}
    if dirty:
        out.update({"dirty_rewrite_mib_s": dirty.rewrite_mib_s, "dirty_plain_s": dirty.plain_s,
                    "dirty_default_s": dirty.default_s, "dirty_throttle_pct": dirty.default.get("throttle_pct"),
                    "dirty_iterations": dirty.default.get("iterations")})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
