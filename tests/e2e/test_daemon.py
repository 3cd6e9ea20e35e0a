"""The real ``cna-agent serve`` process, called over gRPC as the VRM and cna-ctl would."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from google.protobuf import descriptor_pool

from cna_agent.api import pb
from cna_agent.host.topology import probe_topology
from support.agent import free_port

CTL = [sys.executable, "-m", "cna_agent.cli.main"]


def ctl(agent, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([*CTL, "--socket", str(agent.socket), *args], capture_output=True, text=True, timeout=60)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def test_capabilities_match_this_hosts_topology_over_unix_and_tcp(agent):
    expected = probe_topology("/")
    with agent.channel() as ch:
        caps = pb.host_pb2_grpc.HostServiceStub(ch).GetCapabilities(pb.host_pb2.GetCapabilitiesRequest(), timeout=30)
    assert caps.topology.logical_cpus == len(expected.cpus) == os.cpu_count()
    assert list(caps.topology.online_cpus) == list(expected.online_cpus)
    assert [n.id for n in caps.numa_nodes] == [n.id for n in expected.numa_nodes]
    assert caps.memory_total_bytes == expected.memory_total_kib * 1024
    assert caps.cpu.vendor == expected.cpu_vendor
    assert caps.hypervisor.connected and caps.hypervisor.mode == "embedded"
    assert caps.hypervisor.libvirt_version.count(".") == 2
    # Secure Boot as QEMU's firmware descriptors on this host say (the ovmf package ships an
    # enrolled-keys build), and libvirt's domain capabilities list UEFI
    enrolled = any("enrolled-keys" in json.loads(f.read_text()).get("features", [])
                   and os.path.exists(json.loads(f.read_text())["mapping"]["executable"]["filename"])
                   and os.uname().machine in [t["architecture"] for t in json.loads(f.read_text()).get("targets", [])]
                   for f in Path("/usr/share/qemu/firmware").glob("*.json"))
    assert "efi" in caps.hypervisor.firmware and caps.hypervisor.secure_boot == enrolled
    assert caps.cpu.virt_type in ("kvm", "qemu")
    if caps.cpu.virt_type == "qemu":
        assert caps.cpu.kvm_unusable_reason  # TCG is never chosen without saying why
    with grpc.insecure_channel(f"127.0.0.1:{agent.tcp_port}") as tcp:
        caps_tcp = pb.host_pb2_grpc.HostServiceStub(tcp).GetCapabilities(pb.host_pb2.GetCapabilitiesRequest(), timeout=30)
    assert caps_tcp.host_uuid == caps.host_uuid and caps_tcp.host_uuid


def test_stats_health_and_startup_event(agent):
    with agent.channel() as ch:
        stats = pb.host_pb2_grpc.HostServiceStub(ch).GetStats(pb.host_pb2.GetStatsRequest(per_cpu=True), timeout=30)
        assert stats.memory.total_bytes > 0 and 0 <= stats.cpu.percent <= 100
        assert len(stats.cpu.per_cpu_percent) == os.cpu_count()
        assert "lo" in [n.name for n in stats.nics]
        assert stats.hypervisor_health == pb.common_pb2.HEALTH_OK
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "cna.v1.HostService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        events = pb.events_pb2_grpc.EventServiceStub(ch).ListEvents(pb.events_pb2.ListEventsRequest(), timeout=10)
    assert [e.type for e in events.events] == ["agent.started"]
    assert events.events[0].sequence == events.last_sequence == 1


def test_reflection_lists_every_service_for_a_client_we_did_not_write(agent):
    """grpcio-reflection's descriptor database (v1alpha), as a generic client would use it."""
    with agent.channel() as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        for name in pb.SERVICE_NAMES:
            assert name in services
        assert {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"} <= services
        pool = descriptor_pool.DescriptorPool(db)
        vm_service = pool.FindServiceByName("cna.v1.VmService")
        assert "CreateVm" in [m.name for m in vm_service.methods]
        spec = pool.FindMessageTypeByName("cna.v1.VmSpec")
        assert "cpu_qos" in spec.fields_by_name
        # grpcurl asks grpc.reflection.v1 first; the same messages answer there.
        v1 = ch.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        replies = list(v1(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    names = {s.name for s in replies[0].list_services_response.service}
    assert "cna.v1.HostService" in names


def test_operations_api_validates_and_reports_not_found(agent):
    with agent.channel() as ch:
        ops = pb.operations_pb2_grpc.OperationsServiceStub(ch)
        assert list(ops.ListOperations(pb.operations_pb2.ListOperationsRequest(), timeout=10).operations) == []
        with pytest.raises(grpc.RpcError) as info:
            ops.GetOperation(pb.operations_pb2.GetOperationRequest(id="nope"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            ops.ListOperations(pb.operations_pb2.ListOperationsRequest(page_size=5000), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in info.value.details()
        from grpc_status import rpc_status
        from google.rpc import error_details_pb2

        status = rpc_status.from_call(info.value)
        bad = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(bad)
        assert bad.field_violations[0].field == "page_size"


def test_restart_recovers_an_interrupted_operation_without_redoing_it(agent_factory):
    first = agent_factory("node")
    assert first.stop() == 0
    # Simulate a crash mid-operation: a journal row left open, as kill -9 would leave it.
    db = sqlite3.connect(first.dir / "state" / "agent.db")
    op_id = str(uuid.uuid4())
    now = time.time()
    db.execute("INSERT INTO operations(id, kind, target, request_id, state, create_time, update_time) VALUES (?,?,?,?,?,?,?)",
               (op_id, "volume.import", "ds1/a.qcow2", "req-9", "running", now, now))
    db.commit()
    db.close()
    second = agent_factory("node", tcp=False, config=first.config)
    shown = json.loads(ctl(second, "ops", "show", op_id, "--json").stdout)
    assert shown["state"] == "OPERATION_STATE_FAILED" and shown["done"] is True
    assert shown["metadata"]["recovered"] == "true"
    # decided from the datastore: the volume is not there, so the import did not happen
    assert "was not created" in shown["error"]["message"] and "nothing was redone" in shown["error"]["message"], shown
    tail = ctl(second, "events", "tail", "--json").stdout.splitlines()
    types = [json.loads(line)["type"] for line in tail]
    assert types == ["agent.started", "agent.started", "operation.done"] or types.count("agent.started") == 2
    sequences = [json.loads(line)["sequence"] for line in tail]
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)


def test_cna_ctl_tables_json_and_exit_codes(agent, tmp_path):
    info = ctl(agent, "host", "info").stdout
    assert "Topology:" in info and "NUMA nodes:" in info and f"= {os.cpu_count()} CPUs" in info
    data = json.loads(ctl(agent, "host", "info", "--json").stdout)
    assert int(data["topology"]["logical_cpus"]) == os.cpu_count()
    stats = ctl(agent, "--json", "host", "stats").stdout
    assert json.loads(stats)["memory"]["total_bytes"]
    assert "no operations" in ctl(agent, "ops", "list").stdout
    assert "agent.started" in ctl(agent, "events", "tail").stdout
    missing = subprocess.run([*CTL, "--socket", str(tmp_path / "none.sock"), "host", "info"], capture_output=True, text=True, timeout=30)
    assert missing.returncode == 69
    assert "is cna-agent running" in missing.stderr and missing.stderr.count("\n") == 1
    nf = ctl(agent, "ops", "show", "does-not-exist", check=False)
    assert nf.returncode == 1 and "NOT_FOUND" in nf.stderr


def test_unix_socket_is_root_only_and_sigterm_is_clean(agent):
    mode = agent.socket.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(agent.socket.parent.stat().st_mode) == 0o700
    assert agent.stop(signal.SIGTERM) == 0
    assert "event=agent.stopped" in agent.log_text()


def test_second_agent_on_the_same_socket_refuses_to_start(agent, tmp_path):
    cfg = tmp_path / "dup.toml"
    cfg.write_text(agent.config.read_text().replace(f"127.0.0.1:{agent.tcp_port}", ""))
    out = subprocess.run([sys.executable, "-m", "cna_agent.daemon", "serve", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "grpc.unix_socket" in out.stderr and "in use" in out.stderr


def _serve_and_fail(tmp_path: Path, config_text: str) -> subprocess.CompletedProcess:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(config_text)
    return subprocess.run([sys.executable, "-m", "cna_agent.daemon", "serve", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120)


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("cna-agent:")]


def test_broken_config_one_line_nonzero(tmp_path):
    out = _serve_and_fail(tmp_path, "[grpc]\nlisten = '127.0.0.1'\n")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "grpc.listen" in out.stderr


def test_unreadable_certificate_one_line_nonzero(tmp_path):
    out = _serve_and_fail(tmp_path, f"""[grpc]
listen = "127.0.0.1:{free_port()}"
unix_socket = "{tmp_path}/run/s.sock"
[state]
dir = "{tmp_path}/state"
run_dir = "{tmp_path}/run"
[tls]
cert = "{tmp_path}/missing-cert.pem"
key = "{tmp_path}/missing-key.pem"
""")
    assert out.returncode != 0
    lines = _error_lines(out.stderr)
    assert len(lines) == 1 and "tls.cert" in lines[0] and "No such file" in lines[0], out.stderr


def test_occupied_port_one_line_nonzero(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _serve_and_fail(tmp_path, f"""[grpc]
listen = "127.0.0.1:{port}"
unix_socket = "{tmp_path}/run/s.sock"
[state]
dir = "{tmp_path}/state"
run_dir = "{tmp_path}/run"
""")
    assert out.returncode != 0
    lines = _error_lines(out.stderr)
    assert len(lines) == 1 and "grpc.listen" in lines[0] and "in use" in lines[0], out.stderr


def test_events_tail_follow_prints_the_stored_then_the_live_events(agent):
    """``cna-ctl events tail -f`` (WatchEventBatches underneath): the stored events first,
    then one the agent publishes while it follows (a VM defined over the API), each once and
    in sequence order, read from the command's own output."""
    import queue
    import threading

    follow = subprocess.Popen([*CTL, "--socket", str(agent.socket), "events", "tail", "-f", "--json", "--after", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in follow.stdout], daemon=True).start()  # type: ignore[union-attr]

    def until(pred, timeout: float = 30.0) -> list[dict]:
        seen, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                seen.append(json.loads(lines.get(timeout=0.5)))
            except queue.Empty:
                continue
            if pred(seen[-1]):
                return seen
        raise AssertionError(f"not printed in {timeout} s; saw {[e['type'] for e in seen]}")

    try:
        stored = until(lambda e: e["type"] == "agent.started")
        name = f"tail-{uuid.uuid4().hex[:6]}"
        vm = pb.vm_pb2
        with agent.channel() as ch:
            op = pb.vm_pb2_grpc.VmServiceStub(ch).CreateVm(vm.CreateVmRequest(spec=vm.VmSpec(
                name=name, arch=pb.common_pb2.ARCH_X86_64, vcpus=1, memory_mib=32,
                console=vm.ConsoleSpec(type=vm.CONSOLE_TYPE_NONE), hotplug_slots=0)), timeout=60)
            for op in pb.operations_pb2_grpc.OperationsServiceStub(ch).WatchOperation(
                    pb.operations_pb2.WatchOperationRequest(id=op.id), timeout=60):
                pass
            assert not op.HasField("error"), op.error
        live = until(lambda e: e.get("resource_name") == name)
    finally:
        follow.send_signal(signal.SIGINT)
        follow.wait(timeout=10)
    sequences = [int(e["sequence"]) for e in stored + live]
    assert sequences == sorted(set(sequences)), sequences
    assert follow.returncode in (0, 130, -signal.SIGINT), follow.stderr.read()  # type: ignore[union-attr]
