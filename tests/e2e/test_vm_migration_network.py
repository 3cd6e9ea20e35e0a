"""A guest with a NIC keeps answering a peer's ping while it moves from host A to host B.

Each host has its own Linux bridge behind the same port group name (as two hypervisors have
their own bridges onto one physical network); the two bridges are cabled by a veth pair (the
"physical" network), and a peer in a network namespace hangs off A's bridge. The peer pings
the guest every 0.2 s through the move. Judged from outside: the peer's ping replies (they go
on after the switch-over, the longest silence is bounded), the guest's tap on B is enslaved
to B's bridge (sysfs) and A has no tap of it left, and libvirt on each host.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
import uuid as uuidlib
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from cna_agent.api import pb
from support.agent import start_agent
from support.guests import guest_spec, serial_log
from support.hosts import domain_state
from support.migration import agent_config, make_base, tear_down, wait_until
from support.operations import ok

vm = pb.vm_pb2
pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (two libvirtds, bridges, netns)"), pytest.mark.slow]
PING_INTERVAL_S = 0.2


def sh(*argv: str) -> str:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, f"{argv}: {p.stderr}"
    return p.stdout


@pytest.fixture
def wired(two_hosts):
    import libvirt

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    s = uuidlib.uuid4().hex[:5]
    net = f"10.{77 + int(s[0], 16) % 8}.{int(s[1:3], 16)}"
    bridges = {"a": f"mna{s}", "b": f"mnb{s}"}
    base = make_base("mn")
    agents = {}
    for name, host in (("a", two_hosts.a), ("b", two_hosts.b)):
        extra = (f'[network]\nreconcile_interval_s = 0\n[network.bridges.{bridges[name]}]\ntype = "linux"\n'
                 f'[network.port_groups.mnet{s}]\nbridge = "{bridges[name]}"\n')
        agents[name] = start_agent(base / name, None, extra_config=agent_config(host, base / "img", extra))
    ns, legs = f"mnp{s}", (f"mxa{s}", f"mxb{s}", f"mpa{s}", f"mpi{s}")
    try:
        for name in ("a", "b"):
            wait_until(lambda: Path(f"/sys/class/net/{bridges[name]}/bridge").is_dir(), 60, f"bridge {bridges[name]}")
        # the "physical" network between the two hosts' bridges
        sh("ip", "link", "add", legs[0], "type", "veth", "peer", "name", legs[1])
        sh("ip", "link", "set", legs[0], "master", bridges["a"], "up")
        sh("ip", "link", "set", legs[1], "master", bridges["b"], "up")
        # the peer, on A's side
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", legs[2], "type", "veth", "peer", "name", legs[3], "netns", ns)
        sh("ip", "link", "set", legs[2], "master", bridges["a"], "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{net}.1/24", "dev", legs[3])
        sh("ip", "netns", "exec", ns, "ip", "link", "set", legs[3], "up")
        yield agents["a"], agents["b"], two_hosts, {"pg": f"mnet{s}", "net": net, "ns": ns, "bridges": bridges}
    finally:
        for leg in legs[:3]:
            subprocess.run(["ip", "link", "del", leg], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        tear_down(agents.values(), two_hosts, base, tuple(bridges.values()))


def _taps(uri: str, uuid: str) -> list[str]:
    import libvirt

    conn = libvirt.open(uri)
    try:
        root = ET.fromstring(conn.lookupByUUIDString(uuid).XMLDesc(0))
        return [t.get("dev") for t in root.findall("devices/interface/target")]
    finally:
        conn.close()


def _master(dev: str) -> str:
    return os.path.basename(os.readlink(f"/sys/class/net/{dev}/master"))


def test_a_guest_keeps_answering_ping_while_it_moves(wired) -> None:
    a, b, hosts, w = wired
    spec = guest_spec("x86_64", "pinger", nics=[vm.NicSpec(port_group=w["pg"])])
    spec.boot.cmdline += f" cna.ip={w['net']}.2/24"
    with a.channel() as cha, b.channel() as chb:
        vms_a, vms_b = pb.vm_pb2_grpc.VmServiceStub(cha), pb.vm_pb2_grpc.VmServiceStub(chb)
        uuid = ok(cha, vms_a.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60), into=vm.Vm()).uuid
        serial_log(a, uuid).wait_for(r"CNA-GUEST-READY boot=", timeout=150)
        (tap_a,) = _taps(hosts.a.uri, uuid)
        assert _master(tap_a) == w["bridges"]["a"]

        ping = _Ping(w["ns"], f"{w['net']}.2")
        try:
            wait_until(lambda: len(ping.replies) >= 5, 60, "the guest answering the peer")
            moved = ok(cha, vms_a.MigrateVm(vm.MigrateVmRequest(vm=uuid, destination=f"127.0.0.1:{b.tcp_port}"), timeout=60),
                       timeout=180, into=vm.Vm())
            assert moved.uuid == uuid
            moved_at = time.monotonic()
            time.sleep(5)  # pings after the move
        finally:
            ping.stop()
        seqs = [seq for _t, seq in ping.replies]
        assert domain_state(hosts.b.uri, uuid) == (True, True) and domain_state(hosts.a.uri, uuid) is None
        (tap_b,) = _taps(hosts.b.uri, uuid)
        assert _master(tap_b) == w["bridges"]["b"]  # on B's own bridge
        assert not Path(f"/sys/class/net/{tap_a}").exists() or tap_a == tap_b  # A's tap went with A's QEMU
        after = [seq for t, seq in ping.replies if t > moved_at]
        assert len(after) >= 10, f"the peer got {len(after)} replies in the 5 s after the move"
        gaps = [y - x for x, y in zip(seqs, seqs[1:])]
        silence_s = (max(gaps) - 1) * PING_INTERVAL_S
        print(f"ping: {len(seqs)} replies, longest silence {silence_s:.1f} s, {seqs[-1] + 1 - len(seqs)} lost")
        assert silence_s <= 3.0, f"the guest was unreachable for {silence_s:.1f} s"
        assert vms_b.GetVm(vm.GetVmRequest(vm=uuid), timeout=30).status.state == vm.VM_STATE_RUNNING
        ok(chb, vms_b.DeleteVm(vm.DeleteVmRequest(vm=uuid, force=True), timeout=60))


class _Ping:
    """ping from the peer's namespace, every reply recorded with the time it arrived."""

    def __init__(self, ns: str, address: str) -> None:
        self.replies: list[tuple[float, int]] = []
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "ping", "-n", "-i", str(PING_INTERVAL_S), "-W", "1", address],
                                     stdout=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            m = re.search(r"icmp_seq=(\d+)", line)
            if m:
                self.replies.append((time.monotonic(), int(m.group(1))))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self._thread.join(timeout=10)
