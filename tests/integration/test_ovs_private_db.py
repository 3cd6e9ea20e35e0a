"""A private OVSDB with the host's libvirtd (issue 20 item 4): the agent plugs the OVS ports.

libvirtd plugs ``<virtualport type='openvswitch'>`` NICs by running ovs-vsctl against the
*default* database; with ``[network] ovsdb`` pointing elsewhere (here the testbed's private
ovsdb-server) that used to fail every VM start ("Unable to add port vnet0 to OVS bridge"). Now
the agent notices (a libvirtd URI and a non-default database), says so at start-up, renders the
NIC as an ``<interface type='ethernet'>`` tap and adds the port to the bridge through its own
OVSDB connection, with the VLAN tag and the ids libvirt would have set, on start, on hot-plug
and through the reconcile (after an agent restart, after a port was deleted by hand), and
removes it on unplug and stop.

Judged from outside: the guest pings a peer that sits on the same bridge and VLAN in a network
namespace, the private OVSDB lists the port with its tag and external_ids (``ovs-vsctl
--db=unix:...``), the guest's console reports hot-plugged NICs.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from cna_agent.api import pb
from support.agent import remove_system_domains, start_agent
from support.console import AgentConsole
from support.guests import guest_spec, serial_log
from support.operations import ok
from support.ovs import vsctl
from support.tools import REPO
from support.waiting import wait_for

pytestmark = [pytest.mark.needs_root, pytest.mark.slow]
vm, npb = pb.vm_pb2, pb.network_pb2



def sh(*argv: str) -> None:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, f"{argv}: {p.stderr}"


@pytest.fixture
def private_db_agent(testbed, libvirt_caps_cache, system_libvirtd):
    s = uuid.uuid4().hex[:5]
    br, ns, host, inner = f"pb{s}", f"cnq{s}", f"vq{s}", f"pq{s}"
    extra = (f'[compute]\nimage_dirs = "{REPO / ".cache" / "guests"}"\n'
             f'[network]\novsdb = "{testbed.ovsdb_remote}"\nreconcile_interval_s = 3\n'
             f'[network.bridges.{br}]\ntype = "ovs"\ndatapath_type = "netdev"\n'
             f'[network.port_groups.pg{s}]\nbridge = "{br}"\nvlan = 10\n')
    base = Path(tempfile.mkdtemp(prefix="cq", dir="/tmp"))
    started = []

    def start():
        agent = start_agent(base / "a", libvirt_caps_cache, tcp=False, extra_config=extra, mode="system")
        started.append(agent)
        with agent.channel() as ch:
            net = pb.network_pb2_grpc.NetworkServiceStub(ch)
            wait_for(lambda: any(b.name == br and b.health == pb.common_pb2.HEALTH_OK
                                 for b in net.ListBridges(npb.ListBridgesRequest(), timeout=30).bridges), 60, f"bridge {br}")
        return agent

    try:
        agent = start()
        # The peer: a namespace on the same bridge and VLAN (its OVS leg checksums its own packets).
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", host, "type", "veth", "peer", "name", inner, "netns", ns)
        sh("ip", "link", "set", host, "up")
        vsctl(testbed, "add-port", br, host, "tag=10")
        for cmd in (("ethtool", "-K", inner, "tx", "off"), ("ip", "addr", "add", "10.85.0.100/24", "dev", inner),
                    ("ip", "link", "set", inner, "up")):
            sh("ip", "netns", "exec", ns, *cmd)
        yield agent, start, s, br
    finally:
        for a in started:
            a.stop()
        # The guest is left defined on the host's libvirtd (stopped): undefine it here, or its
        # XML stays in /etc/libvirt/qemu for the next run's libvirtd to load (seen after CI runs).
        for a in started:
            remove_system_domains(a)
        subprocess.run(["ip", "link", "del", host], timeout=10, capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], timeout=10, capture_output=True)
        subprocess.run(["ovs-vsctl", f"--db={testbed.ovsdb_remote}", "--timeout=20", "--if-exists", "del-br", br],
                       timeout=30, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _ports(tb, br: str) -> list[str]:
    return vsctl(tb, "list-ports", br).split()


def test_system_libvirtd_with_a_private_ovsdb_gets_its_ports_plugged_by_the_agent(private_db_agent, testbed):
    agent, start, s, br = private_db_agent
    pg, name = f"pg{s}", f"pd{s}"
    assert "event=network.ovs_ports_plugged_by_agent" in agent.log_text()
    assert testbed.ovsdb_remote in agent.log_text()
    with agent.channel() as ch:
        vms = pb.vm_pb2_grpc.VmServiceStub(ch)
        net = pb.network_pb2_grpc.NetworkServiceStub(ch)
        spec = guest_spec("x86_64", name, nics=[vm.NicSpec(port_group=pg)])
        spec.boot.cmdline += " cna.ip=10.85.0.1/24"
        created = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60), into=vm.Vm())
        log = serial_log(agent, created.uuid)
        log.wait_for(r"CNA-GUEST-READY", timeout=180)
        mac = vms.GetVm(vm.GetVmRequest(vm=name), timeout=30).spec.nics[0].mac

        def vif(m: str):
            groups = net.ListPortGroups(npb.ListPortGroupsRequest(), timeout=30).port_groups
            return next((v for g in groups for v in g.vifs if v.mac == m), None)

        wait_for(lambda: vif(mac) is not None and vif(mac).device in _ports(testbed, br), 30, "the port in the private OVSDB")
        dev = vif(mac).device
        assert vsctl(testbed, "get", "Port", dev, "tag") == "10"
        assert vsctl(testbed, "get", "Interface", dev, "external_ids:attached-mac").strip('"') == mac
        assert vsctl(testbed, "get", "Interface", dev, "external_ids:vm-id").strip('"') == created.uuid
        assert vsctl(testbed, "get", "Port", dev, "external_ids:cna-plugged").strip('"') == "agent"

        with AgentConsole(ch, name) as con:
            con.send("\n")
            con.wait_for(r"cna# ", timeout=30, partial=True)
            rc, out = con.run("ping -c 3 -W 2 10.85.0.100", timeout=60)
            assert rc == 0, out

        # Hot-plug: the agent plugs the new tap; unplug: the port goes.
        hot = ok(ch, net.AttachNic(npb.AttachNicRequest(vm=name, nic=vm.NicSpec(port_group=pg)), timeout=60), into=npb.Vif())
        log.wait_for(r"CNA-HOTPLUG add net eth1", timeout=60)
        assert hot.device in _ports(testbed, br), "a hot-plugged NIC is plugged before AttachNic returns"
        assert vsctl(testbed, "get", "Port", hot.device, "tag") == "10"
        ok(ch, net.DetachNic(npb.DetachNicRequest(vm=name, mac=hot.mac), timeout=60))
        log.wait_for(r"CNA-HOTPLUG remove net eth1", timeout=60)
        wait_for(lambda: hot.device not in _ports(testbed, br), 30, "the unplugged NIC's port removed")

    # An agent restart adopts the running guest; a port deleted by hand meanwhile is re-plugged
    # by the reconcile, and the guest talks again.
    agent.stop()
    vsctl(testbed, "del-port", br, dev)
    agent = start()
    wait_for(lambda: dev in _ports(testbed, br), 30, "the port re-plugged after the restart")
    assert vsctl(testbed, "get", "Port", dev, "tag") == "10"
    with agent.channel() as ch:
        with AgentConsole(ch, name) as con:
            con.send("\n")
            con.wait_for(r"cna# ", timeout=30, partial=True)
            rc, out = con.run("ping -c 3 -W 2 10.85.0.100", timeout=60)
            assert rc == 0, out
        ok(ch, pb.vm_pb2_grpc.VmServiceStub(ch).ShutdownVm(vm.ShutdownVmRequest(vm=name, hard=True), timeout=60))
    wait_for(lambda: dev not in _ports(testbed, br), 30, "the stopped VM's port removed")
