"""The stats collector's parsers: /proc/net/dev, query-blockstats, guest-stats, the live XML."""

from __future__ import annotations

from cna_agent.compute.vm_counters import (blockstats_by_alias, guest_memory_keys, layout_from_xml, nic_keys,
                                           parse_net_dev)

NET_DEV = b"""Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    1000      10    0    0    0     0          0         0     1000      10    0    0    0     0       0          0
 vnet0:     176       2    0    1    0     0          0         0     9000      90    3    4    0     0       0          0
"""


def test_net_dev_and_libvirts_direction():
    dev = parse_net_dev(NET_DEV)
    assert set(dev) == {"lo", "vnet0"}
    guest_view = nic_keys(0, "vnet0", dev["vnet0"], swapped=True)
    # A tap: what the host sent into it is what the guest received.
    assert guest_view["net.0.rx.bytes"] == 9000 and guest_view["net.0.rx.pkts"] == 90
    assert guest_view["net.0.rx.errs"] == 3 and guest_view["net.0.rx.drop"] == 4
    assert guest_view["net.0.tx.bytes"] == 176 and guest_view["net.0.tx.drop"] == 1
    host_view = nic_keys(1, "macvtap0", dev["vnet0"], swapped=False)
    assert host_view["net.1.rx.bytes"] == 176 and host_view["net.1.tx.bytes"] == 9000
    assert host_view["net.1.name"] == "macvtap0"


def test_blockstats_keyed_by_the_device_alias():
    reply = [
        {"device": "", "qdev": "/machine/peripheral/virtio-disk0/virtio-backend", "node-name": "libvirt-1-format",
         "stats": {"rd_bytes": 512, "wr_bytes": 1024, "rd_operations": 1, "wr_operations": 2, "flush_operations": 3,
                   "rd_total_time_ns": 10, "wr_total_time_ns": 20, "flush_total_time_ns": 30}},
        {"device": "", "qdev": "/machine/peripheral/sata0-0-0", "stats": {}},
    ]
    out = blockstats_by_alias(reply)
    assert out["virtio-disk0"] == {"rd.reqs": 1, "rd.bytes": 512, "rd.times": 10, "wr.reqs": 2, "wr.bytes": 1024,
                                   "wr.times": 20, "fl.reqs": 3, "fl.times": 30}
    assert out["sata0-0-0"]["rd.bytes"] == 0


def test_guest_memory_skips_what_the_guest_never_sent():
    reply = {"stats": {"stat-free-memory": 2 << 20, "stat-total-memory": 8 << 20, "stat-available-memory": -1},
             "last-update": 1700000000}
    assert guest_memory_keys(reply) == {"unused": 2048, "available": 8192, "last-update": 1700000000}
    assert guest_memory_keys({"stats": {}, "last-update": 0}) == {}


LIVE = """<domain type='kvm' id='7'><name>v</name><uuid>00000000-0000-0000-0000-000000000001</uuid>
<memory unit='KiB'>1048576</memory><currentMemory unit='KiB'>524288</currentMemory><vcpu placement='static'>4</vcpu>
<devices>
 <disk type='file' device='disk'><source file='/ds/a.qcow2'/><target dev='vda' bus='virtio'/><alias name='virtio-disk0'/></disk>
 <disk type='file' device='cdrom'><target dev='sda' bus='sata'/><alias name='sata0-0-0'/></disk>
 <interface type='bridge'><source bridge='br0'/><target dev='vnet3'/><alias name='net0'/></interface>
 <interface type='direct'><source dev='eth0' mode='bridge'/><target dev='macvtap1'/><alias name='net1'/></interface>
 <memballoon model='virtio'><stats period='10'/><alias name='balloon0'/></memballoon>
</devices></domain>"""


def test_layout_from_the_live_definition():
    layout, why = layout_from_xml(LIVE, 7)
    assert why == "" and layout is not None
    assert layout.nics == (("vnet3", True), ("macvtap1", False))
    assert layout.disks == (("vda", "virtio-disk0", "/ds/a.qcow2"), ("sda", "sata0-0-0", ""))
    assert (layout.balloon_current_kib, layout.balloon_maximum_kib, layout.vcpus_maximum) == (524288, 1048576, 4)
    assert layout.balloon_qom == "/machine/peripheral/balloon0"


def test_devices_without_a_cheap_source_send_the_vm_to_libvirt():
    vhost = LIVE.replace("<interface type='bridge'><source bridge='br0'/><target dev='vnet3'/>",
                         "<interface type='vhostuser'><source type='unix' path='/run/vu.sock' mode='server'/>")
    layout, why = layout_from_xml(vhost, 7)
    assert layout is None and "vhostuser" in why
    no_stats = LIVE.replace("<stats period='10'/>", "")
    layout, _ = layout_from_xml(no_stats, 7)
    assert layout is not None and layout.balloon_qom == ""  # no guest report to read


def test_capacity_from_query_block():
    from cna_agent.compute.vm_counters import capacity_by_alias

    reply = [{"device": "", "qdev": "/machine/peripheral/virtio-disk0/virtio-backend",
              "inserted": {"image": {"virtual-size": 8 << 20, "actual-size": 200704, "format": "qcow2"}}},
             {"device": "", "qdev": "/machine/peripheral/sata0-0-0", "tray_open": False}]  # a CD-ROM with no medium
    assert capacity_by_alias(reply) == {"virtio-disk0": 8 << 20}
