"""compute/guest_agent.py: libvirt's guest-info parameters read into GuestInfo, the tools status
from the channel's live state, and the read policy (one read at a time, bounded rate, the last
good read marked stale when the guest agent stops answering).

libvirt's test driver has no guest agent, so the reads here go to a stand-in connection that
answers with parameters recorded from a real Debian 12 guest (qemu-guest-agent 7.2 through
libvirt 9.0's virDomainGetGuestInfo); tests/e2e/test_guest_agent.py reads a real one (the e2e module has the plain name).
"""

from __future__ import annotations

import asyncio
import threading

import libvirt
import pytest

from cna_agent.blocking import BlockingPool
from cna_agent.compute import domxml as dx
from cna_agent.compute import guest_agent as ga
from cna_agent.compute.spec import NicSpec, VmSpec
from cna_agent.errors import FailedPrecondition

MAC = "52:54:00:12:34:56"
#: What virDomainGetGuestInfo returned for the Debian test guest (trimmed to what is parsed).
PARAMS = {
    "os.id": "debian", "os.name": "Debian GNU/Linux", "os.pretty-name": "Debian GNU/Linux 12 (bookworm)",
    "os.version": "12 (bookworm)", "os.version-id": "12", "os.kernel-release": "6.1.0-57-cloud-amd64",
    "os.kernel-version": "#1 SMP PREEMPT_DYNAMIC Debian 6.1.192-3 (2026-11-26)", "os.machine": "x86_64",
    "hostname": "cna-debian", "timezone.name": "UTC", "timezone.offset": 0,
    "user.count": 2, "user.0.name": "root", "user.0.login-time": 1796343799000, "user.1.name": "root",
    "fs.count": 1, "fs.0.name": "vda", "fs.0.mountpoint": "/", "fs.0.fstype": "ext4",
    "fs.0.total-bytes": 3_110_000_000, "fs.0.used-bytes": 610_000_000, "fs.0.disk.count": 1,
    "fs.0.disk.0.alias": "virtio-disk0", "fs.0.disk.0.device": "/dev/vda",
    "if.count": 3, "if.0.name": "lo", "if.0.hwaddr": "00:00:00:00:00:00", "if.0.addr.count": 1,
    "if.0.addr.0.type": "ipv4", "if.0.addr.0.addr": "127.0.0.1", "if.0.addr.0.prefix": 8,
    "if.1.name": "enp1s0", "if.1.hwaddr": MAC.upper(), "if.1.addr.count": 2,
    "if.1.addr.0.type": "ipv4", "if.1.addr.0.addr": "192.0.2.10", "if.1.addr.0.prefix": 24,
    "if.1.addr.1.type": "ipv6", "if.1.addr.1.addr": "fe80::5054:ff:fe12:3456", "if.1.addr.1.prefix": 64,
    "if.2.name": "dummy0", "if.2.hwaddr": "aa:bb:cc:dd:ee:ff", "if.2.addr.count": 0,
}
LIVE = """<domain type='qemu'><name>g</name><devices>
<disk type='file' device='disk'><target dev='vda' bus='virtio'/><alias name='virtio-disk0'/></disk>
<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0' state='@STATE@'/></channel>
</devices></domain>"""


def test_guest_info_parameters_become_nics_by_mac_filesystems_by_disk_and_the_os() -> None:
    got = ga.parse_guest_info(PARAMS, ["52:54:00:00:00:01", MAC], {"virtio-disk0": "vda"})
    assert (got["os_id"], got["os_version"], got["kernel_release"], got["hostname"]) == (
        "debian", "12", "6.1.0-57-cloud-amd64", "cna-debian")
    assert [(i.name, i.mac, i.nic_index) for i in got["interfaces"]] == [("enp1s0", MAC, 1), ("dummy0", "aa:bb:cc:dd:ee:ff", -1)]
    assert [(a.type, a.address, a.prefix) for a in got["interfaces"][0].addresses] == [
        ("ipv4", "192.0.2.10", 24), ("ipv6", "fe80::5054:ff:fe12:3456", 64)]
    (fs,) = got["filesystems"]
    assert (fs.mountpoint, fs.fstype, fs.total_bytes, fs.used_bytes, fs.disks) == ("/", "ext4", 3_110_000_000, 610_000_000, ("vda",))
    assert got["users"] == ("root",)  # two sessions, one user


def test_an_empty_answer_gives_empty_fields_not_an_error() -> None:
    got = ga.parse_guest_info({}, [], {})
    assert got["interfaces"] == () and got["filesystems"] == () and got["hostname"] == ""


class _Dom:
    def __init__(self, conn: "_Conn") -> None:
        self.conn = conn

    def XMLDesc(self, _flags: int) -> str:  # noqa: N802 (libvirt's name)
        return LIVE.replace("@STATE@", "connected")

    def setMetadata(self, _type: int, xml: str, key: str, uri: str, flags: int) -> None:  # noqa: N802
        self.conn.marks.append((xml, key, uri, flags))

    def guestInfo(self, _types: int, _flags: int) -> dict:  # noqa: N802
        self.conn.reads += 1
        self.conn.release.wait(10)
        if self.conn.fail:
            raise libvirt.libvirtError("Guest agent is not responding: Guest agent not available for now")
        return PARAMS


class _Conn:
    def __init__(self) -> None:
        self.reads = 0
        self.marks: list[tuple] = []
        self.fail = False
        self.release = threading.Event()
        self.release.set()

    def lookupByUUIDString(self, _uuid: str) -> _Dom:  # noqa: N802
        return _Dom(self)


class _Hv:
    """Hypervisor.call's contract: fn(conn) in the given pool, with a deadline."""

    def __init__(self, conn: _Conn) -> None:
        self.conn = conn

    async def call(self, fn, *, timeout=None, what="", pool=None, outlast=0.0):
        return await pool.run(lambda: fn(self.conn), timeout=timeout, what=what)


class _Def:
    def __init__(self, spec: VmSpec) -> None:
        self.spec = spec
        self.managed = True


class _Inv:
    def __init__(self, spec: VmSpec, state: str = "running") -> None:
        self._spec, self.vm_state = spec, state

    async def lookup_uuid(self, ref: str) -> tuple[str, str]:
        return "u1", "g"

    async def state(self, _uuid: str) -> str:
        return self.vm_state

    async def definition(self, _uuid: str) -> _Def:
        return _Def(self._spec)


@pytest.fixture
def agents(monkeypatch):
    monkeypatch.setattr(ga, "_agent_version", lambda _dom: "7.2.22")
    conn = _Conn()
    pool = BlockingPool("ga-test", 2, 5.0)
    spec = VmSpec(name="g", guest_agent=True, nics=[NicSpec(port_group="pg", mac=MAC)])
    clock = [100.0]
    yield ga.GuestAgents(_Hv(conn), _Inv(spec), pool=pool, min_interval_s=10, clock=lambda: clock[0]), conn, clock
    pool.shutdown()


def test_reads_are_shared_rate_bounded_and_stale_with_the_error_when_the_agent_stops_answering(agents) -> None:
    agents_, conn, clock = agents

    async def go() -> None:
        conn.release.clear()
        first, second = asyncio.ensure_future(agents_.info("g")), asyncio.ensure_future(agents_.info("g"))
        await asyncio.sleep(0.1)
        conn.release.set()
        a, b = await first, await second
        assert conn.reads == 1 and a is b  # one read served both callers
        assert a.tools_status == ga.RUNNING and a.tools_version == "7.2.22" and a.interfaces[0].nic_index == 0
        assert not a.stale and a.read_at is not None
        # the first read left its mark in the live definition only (it dies with the QEMU process)
        assert [(k, f) for _x, k, _u, f in conn.marks] == [("ga", libvirt.VIR_DOMAIN_AFFECT_LIVE)]
        assert "version=\"7.2.22\"" in conn.marks[0][0]
        clock[0] += 5
        assert await agents_.info("g", max_age_s=0) is a and conn.reads == 1  # younger than the interval
        clock[0] += 6
        conn.fail = True
        c = await agents_.info("g")
        assert conn.reads == 2 and c.stale and "not responding" in c.error
        assert c.hostname == "cna-debian" and c.read_at == a.read_at  # the last good read, marked stale
        assert c.tools_status == ga.NOT_RUNNING  # it answered before: now it is gone

    asyncio.run(go())


def test_tools_status_comes_from_the_live_channel_state(agents) -> None:
    agents_, _conn, _clock = agents
    spec = VmSpec(name="g", guest_agent=True)
    disconnected = dx.Domain.from_xml(LIVE.replace("@STATE@", "disconnected"))
    connected = dx.Domain.from_xml(LIVE.replace("@STATE@", "connected"))
    assert agents_.tools_status("u2", spec, None) == (ga.VM_NOT_RUNNING, "")
    assert agents_.tools_status("u2", spec, dx.Domain.from_xml("<domain><devices/></domain>")) == (ga.NO_CHANNEL, "")
    assert agents_.tools_status("u2", spec, disconnected) == (ga.NOT_INSTALLED, "")
    assert agents_.tools_status("u2", spec, connected)[0] == ga.RUNNING
    assert agents_.tools_status("u2", spec, disconnected)[0] == ga.NOT_RUNNING  # seen connected before
    agents_.vm_state_changed("u2", "stopped")
    assert agents_.tools_status("u2", spec, disconnected)[0] == ga.NOT_INSTALLED  # a new boot starts from nothing


def test_a_guest_agent_seen_by_an_earlier_agent_process_reads_not_running_from_the_live_mark(agents) -> None:
    """The mark a read wrote into the live definition (metadata that dies with the QEMU process)
    tells a restarted agent that the guest agent was there: stopped, not missing."""
    from cna_agent.compute.guest_agent import SEEN_NS

    agents_, _conn, _clock = agents
    spec = VmSpec(name="g", guest_agent=True)
    marked = LIVE.replace("@STATE@", "disconnected").replace(
        "<devices>", f"<metadata><ga:seen xmlns:ga='{SEEN_NS}' version='7.2.22'/></metadata><devices>", 1)
    assert "ga:seen" in marked
    assert agents_.tools_status("u3", spec, dx.Domain.from_xml(marked)) == (ga.NOT_RUNNING, "7.2.22")
    assert agents_.tools_status("u4", spec, dx.Domain.from_xml(LIVE.replace("@STATE@", "disconnected")))[0] == ga.NOT_INSTALLED


def test_a_stopped_vm_or_one_without_a_channel_is_answered_without_a_read(agents) -> None:
    agents_, conn, _clock = agents

    async def go() -> None:
        agents_._inv.vm_state = "stopped"
        with pytest.raises(FailedPrecondition, match="not running"):
            await agents_.info("g")
        agents_._inv.vm_state = "running"
        agents_._inv._spec = VmSpec(name="g", guest_agent=False)
        got = await agents_.info("g")
        assert got.tools_status == ga.NO_CHANNEL and "spec.guest_agent" in got.error and conn.reads == 0

    asyncio.run(go())
