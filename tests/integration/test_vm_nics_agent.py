"""VM NICs are compute's devices: AttachNic, DetachNic and SetNicLink through the real
``cna-agent serve`` process, on a real guest, with real Open vSwitch (netdev datapath).

Judged from outside the agent where possible: the guest's own console (hot-plug seen, carrier,
the NICs and MACs it finds at boot), OVSDB (port tags and labels), and the persistent domain
definition libvirt keeps on disk (the embedded driver's <root>/etc/.../<name>.xml). The point of
the architecture change: after AttachNic the VM's spec has the NIC, so GetVm lists it, a stopped
UpdateVm (which re-renders the domain from the spec) keeps it, and after an agent restart and a
guest restart the guest still has it.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import grpc
import pytest

from cna_agent.api import pb
from support.agent import start_agent
from support.console import AgentConsole, facts
from support.guests import guest_spec, serial_log
from support.operations import ok
from support.ovs import vsctl
from support.tools import REPO
from support.waiting import wait_for

pytestmark = [pytest.mark.needs_root, pytest.mark.slow]
vm, npb = pb.vm_pb2, pb.network_pb2



def _persistent_interfaces(agent, name: str) -> list[tuple[str, str]]:
    """(mac, bridge) of every <interface> in the definition libvirt persisted for ``name``."""
    (path,) = [p for p in (agent.dir / "state" / "libvirt" / "etc").rglob(f"{name}.xml") if "autostart" not in p.parts]
    root = ET.parse(path).getroot()
    return [(i.find("mac").get("address"), i.find("source").get("bridge")) for i in root.findall("devices/interface")]


def _rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


@pytest.fixture
def nic_agent(testbed, libvirt_caps_cache):
    """An agent (short /tmp path for QEMU's sockets) with one OVS netdev bridge and two VLAN port
    groups declared in agent.toml, on the session's testbed OVS."""
    s = uuid.uuid4().hex[:5]
    br = f"nb{s}"
    extra = (f'[compute]\nimage_dirs = "{REPO / ".cache" / "guests"}"\n'
             f'[network]\novsdb = "{testbed.ovsdb_remote}"\nreconcile_interval_s = 0\n'
             f'[network.bridges.{br}]\ntype = "ovs"\ndatapath_type = "netdev"\n'
             f'[network.port_groups.pga{s}]\nbridge = "{br}"\nvlan = 10\n'
             f'[network.port_groups.pgb{s}]\nbridge = "{br}"\nvlan = 20\n')
    base = Path(tempfile.mkdtemp(prefix="cn", dir="/tmp"))
    agents = []

    def start():
        agent = start_agent(base / "a", libvirt_caps_cache, tcp=False, extra_config=extra)
        agents.append(agent)
        # The declared bridge is applied in the background once the agent serves; ovs-vswitchd
        # brings its interface up shortly after (until then the agent reports it degraded).
        with agent.channel() as ch:
            net = pb.network_pb2_grpc.NetworkServiceStub(ch)
            try:
                wait_for(lambda: any(b.name == br and b.health == pb.common_pb2.HEALTH_OK
                                     for b in net.ListBridges(npb.ListBridgesRequest(), timeout=30).bridges), 60, f"bridge {br}")
            except AssertionError as exc:
                log = "\n".join(line for line in agent.log_text().splitlines() if "event=rpc " not in line)
                raise AssertionError(f"{exc}\n{net.ListBridges(npb.ListBridgesRequest(), timeout=30)}\n{log[-6000:]}") from None
        return agent

    yield start, s, br
    for agent in agents:
        agent.stop()
    vsctl(testbed, "--if-exists", "del-br", br)
    shutil.rmtree(base, ignore_errors=True)


def test_attached_nic_is_in_the_spec_survives_a_stopped_update_and_both_restarts(nic_agent, testbed):
    start, s, br = nic_agent
    pga, pgb = f"pga{s}", f"pgb{s}"
    agent = start()
    name = f"nic{s}"
    with agent.channel() as ch:
        vms = pb.vm_pb2_grpc.VmServiceStub(ch)
        net = pb.network_pb2_grpc.NetworkServiceStub(ch)
        spec = guest_spec("x86_64", name, nics=[vm.NicSpec(port_group=pga)])
        spec.boot.cmdline += " cna.ip=10.79.0.1/24"
        created = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60), into=vm.Vm())
        uuid_ = created.uuid
        log = serial_log(agent, uuid_)
        log.wait_for(r"CNA-GUEST-READY", timeout=180)
        assert facts(log.text())["net"] == "eth0"

        # Hot-plug into the running guest: the guest sees eth1, OVS tags and labels the port.
        vif = ok(ch, net.AttachNic(npb.AttachNicRequest(vm=name, nic=vm.NicSpec(port_group=pgb)), timeout=60), into=npb.Vif())
        log.wait_for(r"CNA-HOTPLUG add net eth1", timeout=60)
        assert vif.vm_uuid == uuid_ and vif.device and vif.link_up
        assert vsctl(testbed, "get", "Port", vif.device, "tag") == "20"
        assert vsctl(testbed, "get", "Interface", vif.device, "external_ids:vm-uuid").strip('"') == uuid_
        assert vsctl(testbed, "get", "Interface", vif.device, "external_ids:port-group").strip('"') == pgb
        got = vms.GetVm(vm.GetVmRequest(vm=name), timeout=30)
        assert [(n.port_group, n.mac) for n in got.spec.nics][1] == (pgb, vif.mac)
        assert (vif.mac, br) in _persistent_interfaces(agent, name)

        # Refused at the door, changing nothing: a MAC in use, an unknown port group, a bad MAC, no such VM.
        before = vsctl(testbed, "show")
        err = _rpc_error(lambda: net.AttachNic(npb.AttachNicRequest(vm=name, nic=vm.NicSpec(port_group=pga, mac=vif.mac)), timeout=30))
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "nic.mac" in err.details()
        err = _rpc_error(lambda: net.AttachNic(npb.AttachNicRequest(vm=name, nic=vm.NicSpec(port_group="nosuchpg")), timeout=30))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "nic.port_group" in err.details()
        err = _rpc_error(lambda: net.AttachNic(npb.AttachNicRequest(vm=name, nic=vm.NicSpec(port_group=pga, mac="01:00:5e:00:00:01")), timeout=30))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "nic.mac" in err.details()
        err = _rpc_error(lambda: net.AttachNic(npb.AttachNicRequest(vm="no-such-vm", nic=vm.NicSpec(port_group=pga)), timeout=30))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        err = _rpc_error(lambda: net.DetachNic(npb.DetachNicRequest(vm=name, mac="52:54:00:ff:ff:fe"), timeout=30))
        assert err.code() == grpc.StatusCode.NOT_FOUND and "mac" in err.details()
        assert vsctl(testbed, "show") == before
        assert len(vms.GetVm(vm.GetVmRequest(vm=name), timeout=30).spec.nics) == 2

        # Link down/up: the guest's carrier follows, and the spec remembers it.
        with AgentConsole(ch, name) as console:
            console.send("\n")
            console.wait_for(r"cna# ", timeout=30, partial=True)
            ok(ch, net.SetNicLink(npb.SetNicLinkRequest(vm=name, mac=vif.mac, up=False), timeout=60))
            assert console.run("cat /sys/class/net/eth1/carrier")[1].strip() == "0"
            assert vms.GetVm(vm.GetVmRequest(vm=name), timeout=30).spec.nics[1].link_down
            ok(ch, net.SetNicLink(npb.SetNicLinkRequest(vm=name, mac=vif.mac, up=True), timeout=60))
            assert console.run("cat /sys/class/net/eth1/carrier")[1].strip() == "1"
        assert not vms.GetVm(vm.GetVmRequest(vm=name), timeout=30).spec.nics[1].link_down

        # Unplug: the guest sees it go, the port leaves OVS, the spec and the definition drop it.
        ok(ch, net.DetachNic(npb.DetachNicRequest(vm=name, mac=vif.mac), timeout=60))
        log.wait_for(r"CNA-HOTPLUG remove net eth1", timeout=60)
        assert vif.device not in vsctl(testbed, "list-ports", br).split()
        assert [n.port_group for n in vms.GetVm(vm.GetVmRequest(vm=name), timeout=30).spec.nics] == [pga]
        assert vif.mac not in [m for m, _ in _persistent_interfaces(agent, name)]

        # Plug one again (a MAC of the caller's choosing), then stop the VM and update it: the
        # stopped update re-renders the whole domain from the spec, and the NIC stays.
        mac = "52:54:00:5e:0a:" + s[:2]
        ok(ch, net.AttachNic(npb.AttachNicRequest(vm=name, nic=vm.NicSpec(port_group=pgb, mac=mac)), timeout=60))
        log.wait_for(r"CNA-HOTPLUG add net eth1", count=2, timeout=60)
        ok(ch, vms.ShutdownVm(vm.ShutdownVmRequest(vm=name, hard=True), timeout=60))
        ok(ch, vms.UpdateVm(vm.UpdateVmRequest(vm=name, spec=vm.VmSpec(description="updated", vcpus=2),
                                               update_mask=["description", "vcpus"]), timeout=60))
        assert (mac, br) in _persistent_interfaces(agent, name)
    assert agent.stop() == 0

    # A new agent process adopts the VM from its definition: the spec still lists the NIC.
    agent = start()
    with agent.channel() as ch:
        vms = pb.vm_pb2_grpc.VmServiceStub(ch)
        got = vms.GetVm(vm.GetVmRequest(vm=name), timeout=30)
        assert [(n.port_group, n.mac) for n in got.spec.nics] == [(pga, got.spec.nics[0].mac), (pgb, mac)]
        assert got.spec.description == "updated" and got.spec.vcpus == 2

        # The guest, booted again, finds both NICs, the second with its MAC, on its VLAN.
        ok(ch, vms.StartVm(vm.VmActionRequest(vm=name), timeout=60))
        log = serial_log(agent, uuid_)
        log.wait_for(r"CNA-GUEST-READY", count=2, timeout=180)
        booted = facts(log.text()[log.text().rindex("CNA-FACT arch="):])
        assert booted["net"] == "eth0,eth1" and booted["net.eth1.mac"] == mac and booted["cpus"] == "2"
        ports = vsctl(testbed, "--format=csv", "--data=bare", "--no-headings", "--columns=name,mac_in_use,external_ids",
                      "find", "Interface", f'external_ids:attached-mac="{mac}"')
        dev = ports.split(",")[0]
        assert vsctl(testbed, "get", "Port", dev, "tag") == "20"
        ok(ch, vms.DeleteVm(vm.DeleteVmRequest(vm=name, force=True), timeout=60))
