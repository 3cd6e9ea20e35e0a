"""NetworkService over gRPC on the real ``cna-agent serve`` process, against a real OVS (netdev).

Checks the VRM's view: declared bridges from agent.toml are applied at start; bad input is
INVALID_ARGUMENT naming the field and changes nothing in OVS; EnsureBridge/EnsurePortGroup run
as operations and are idempotent; a bridge deleted by hand is reported by Reconcile and
repaired; API declarations survive an agent restart; ``cna-ctl net`` shows them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import grpc
import pytest
from grpc_status import rpc_status

from cna_agent.api import pb
from support.operations import ok

pytestmark = [pytest.mark.needs_root, pytest.mark.slow]
npb = pb.network_pb2


@pytest.fixture(scope="module")
def ovs(testbed):
    """The session's testbed OVS: one netdev-datapath ovs-vswitchd per network namespace
    works (a second one cannot open its "ovs-netdev" device), so tests share it."""
    return testbed


def vsctl(tb, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ovs-vsctl", f"--db={tb.ovsdb_remote}", "--timeout=20", *args], capture_output=True, text=True, timeout=30)


def _bad(call, field: str, code=grpc.StatusCode.INVALID_ARGUMENT) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    status = rpc_status.from_call(err.value)
    assert field in err.value.details()
    return err.value.details() + (str(status.details) if status else "")


def test_network_api_end_to_end(agent_factory, ovs):
    s = uuid.uuid4().hex[:5]
    cfg_br, api_br = f"cfg{s}", f"api{s}"
    extra = (f'[network]\novsdb = "{ovs.ovsdb_remote}"\nreconcile_interval_s = 0\n'
             f'[network.bridges.{cfg_br}]\ntype = "ovs"\ndatapath_type = "netdev"\n'
             f'[network.port_groups.cfgpg{s}]\nbridge = "{cfg_br}"\nvlan = 42\n')
    agent = agent_factory("net", extra_config=extra)
    try:
        with agent.channel() as ch:
            net = pb.network_pb2_grpc.NetworkServiceStub(ch)
            ops = pb.operations_pb2_grpc.OperationsServiceStub(ch)
            deadline = time.monotonic() + 30
            while vsctl(ovs, "br-exists", cfg_br).returncode != 0:
                assert time.monotonic() < deadline, agent.log_text()[-3000:]
                time.sleep(0.3)
            # ovs-vswitchd brings a new netdev bridge's interface up shortly after the bridge row
            # exists; until then the agent truthfully reports it degraded.
            while True:
                listed = {b.name: b for b in net.ListBridges(npb.ListBridgesRequest(), timeout=30).bridges}
                if listed[cfg_br].health == pb.common_pb2.HEALTH_OK or time.monotonic() > deadline + 30:
                    break
                time.sleep(0.3)
            assert listed[cfg_br].type == npb.BRIDGE_TYPE_OVS and listed[cfg_br].datapath_type == "netdev"
            assert listed[cfg_br].health == pb.common_pb2.HEALTH_OK, listed[cfg_br].health_reason

            before = vsctl(ovs, "show").stdout
            _bad(lambda: net.EnsureBridge(npb.EnsureBridgeRequest(bridge=npb.Bridge(name="x" * 16, type=npb.BRIDGE_TYPE_OVS)), timeout=30), "bridge.name")
            _bad(lambda: net.EnsureBridge(npb.EnsureBridgeRequest(bridge=npb.Bridge(name=api_br, type=npb.BRIDGE_TYPE_OVS, uplink="nosuchnic9")), timeout=30), "bridge.uplink")
            _bad(lambda: net.EnsurePortGroup(npb.EnsurePortGroupRequest(port_group=npb.PortGroup(name="p1", bridge=cfg_br, vlan=4095)), timeout=30), "port_group.vlan")
            _bad(lambda: net.EnsurePortGroup(npb.EnsurePortGroupRequest(port_group=npb.PortGroup(name="p1", bridge="nosuchbr", vlan=5)), timeout=30), "port_group.bridge")
            _bad(lambda: net.AttachNic(npb.AttachNicRequest(vm="no-such-vm", nic=pb.vm_pb2.NicSpec(port_group=f"cfgpg{s}")), timeout=30), "vm", grpc.StatusCode.NOT_FOUND)
            assert vsctl(ovs, "show").stdout == before

            req = npb.EnsureBridgeRequest(request_id=f"rq-{s}", bridge=npb.Bridge(name=api_br, type=npb.BRIDGE_TYPE_OVS, datapath_type="netdev", fail_mode="secure"))
            op = ok(ops, net.EnsureBridge(req, timeout=30), 30, poll=True)
            bridge = npb.Bridge()
            op.response.Unpack(bridge)
            assert bridge.fail_mode == "secure"
            assert vsctl(ovs, "get", "Bridge", api_br, "fail_mode").stdout.strip() == "secure"
            again = net.EnsureBridge(req, timeout=30)
            assert again.id == op.id  # same request id: the first result, not a second run
            op = ok(ops, net.EnsurePortGroup(npb.EnsurePortGroupRequest(port_group=npb.PortGroup(name=f"web{s}", bridge=api_br, trunk_vlans=[7, 5])), timeout=30), 30, poll=True)
            pgs = {p.name: p for p in net.ListPortGroups(npb.ListPortGroupsRequest(bridge=api_br), timeout=30).port_groups}
            assert list(pgs[f"web{s}"].trunk_vlans) == [5, 7]

            # Drift: the config bridge deleted by hand.
            assert vsctl(ovs, "del-br", cfg_br).returncode == 0
            drift = net.Reconcile(npb.ReconcileRequest(repair=False), timeout=60).drift
            assert [(d.resource, d.repaired) for d in drift] == [(f"bridge/{cfg_br}", False)]
            drift = net.Reconcile(npb.ReconcileRequest(repair=True), timeout=60).drift
            assert [(d.resource, d.repaired) for d in drift] == [(f"bridge/{cfg_br}", True)]
            assert vsctl(ovs, "br-exists", cfg_br).returncode == 0

            cli = subprocess.run([sys.executable, "-m", "cna_agent.cli.main", "--socket", str(agent.socket), "--json", "net", "bridges"],
                                 capture_output=True, text=True, timeout=60)
            assert cli.returncode == 0, cli.stderr
            assert {b["name"] for b in json.loads(cli.stdout)} >= {cfg_br, api_br}
            cli = subprocess.run([sys.executable, "-m", "cna_agent.cli.main", "--socket", str(agent.socket), "net", "port-groups"],
                                 capture_output=True, text=True, timeout=60)
            assert cli.returncode == 0 and f"web{s}" in cli.stdout and f"cfgpg{s}" in cli.stdout, cli.stdout + cli.stderr

        # API declarations are kept across a restart.
        agent.stop()
        agent2 = agent_factory("net", extra_config=extra)
        with agent2.channel() as ch:
            net = pb.network_pb2_grpc.NetworkServiceStub(ch)
            names = {b.name for b in net.ListBridges(npb.ListBridgesRequest(), timeout=30).bridges}
            assert api_br in names and cfg_br in names
            assert f"web{s}" in {p.name for p in net.ListPortGroups(npb.ListPortGroupsRequest(), timeout=30).port_groups}
    finally:
        for br in (cfg_br, api_br):
            vsctl(ovs, "--if-exists", "del-br", br)
