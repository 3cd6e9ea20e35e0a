"""Prove the testbed tooling: guests boot and power off under libvirt, OVS and tgtd serve.

Why: every later integration test builds on these pieces; when one breaks, this file says which.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from support.console import ConsoleSocket, SerialLog, facts
from support.guests import domain_xml


def _wait_gone(dom, timeout: float) -> float:
    """Seconds until a transient domain stops (it disappears when it powers off)."""
    import libvirt

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if not dom.isActive():
                return time.monotonic() - t0
        except libvirt.libvirtError:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"domain still running {timeout}s after ACPI shutdown")


@pytest.mark.slow
@pytest.mark.needs_root
def test_x86_64_guest_boots_reboots_and_powers_off(embedded_libvirt, test_guest, tmp_path: Path) -> None:
    import libvirt

    guest = test_guest("x86_64")
    state = tmp_path / "state.img"
    state.write_bytes(b"\0" * 1024 * 1024)
    log, sock = tmp_path / "serial.log", tmp_path / "serial.sock"
    disks = (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
             f"<source file='{state}'/><target dev='vda' bus='virtio'/><serial>cna-state</serial></disk>"
             "<interface type='user'><model type='virtio'/></interface>"
             "<controller type='pci' index='0' model='pcie-root'/>" + "<controller type='pci' model='pcie-root-port'/>" * 5)
    xml = domain_xml("cna-x86", guest, serial_log=log, serial_socket=sock, vcpus=2,
                     cmdline_extra="cna.ip=10.0.2.15/24 cna.marker=X86-UP", devices_extra=disks)
    t0 = time.monotonic()
    dom = embedded_libvirt.createXML(xml, 0)
    serial = SerialLog(log)
    with ConsoleSocket(sock) as con:
        serial.wait_for(r"^X86-UP boot=1$", timeout=120)
        print(f"x86_64 marker after {time.monotonic() - t0:.1f}s")
        f = facts(serial.text())
        assert f["arch"] == "x86_64" and f["cpus"] == "2" and f["numa_nodes"] == "1"
        assert f["net"] == "eth0" and f["net.eth0.ipv4"] == "10.0.2.15/24"
        assert f["block"] == "vda" and f["block.vda.serial"] == "cna-state"
        assert 200_000 < int(f["mem_kb"]) <= 262_144
        con.wait_for(r"cna# ", timeout=10, partial=True)
        # IFF_UP set by init (operstate may still lag behind carrier, so it is not checked)
        rc, out = con.run("uname -m; echo $(( $(cat /sys/class/net/eth0/flags) & 1 ))")
        assert rc == 0 and out.split() == ["x86_64", "1"], out
        rc, out = con.run("false")
        assert rc == 1

        extra = tmp_path / "extra.img"
        extra.write_bytes(b"\0" * 1024 * 1024)
        disk = (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                f"<source file='{extra}'/><target dev='vdb' bus='virtio'/></disk>")
        dom.attachDeviceFlags(disk, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        serial.wait_for(r"^CNA-HOTPLUG add block vdb$", timeout=60)
        dom.detachDeviceFlags(disk, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        serial.wait_for(r"^CNA-HOTPLUG remove block vdb$", timeout=60)

        dom.reboot(0)  # ACPI power button; libvirt restarts the guest when it powers off
        serial.wait_for(r"^X86-UP boot=2$", timeout=120)
        assert serial.count("^CNA-GUEST-POWEROFF$") == 1

        dom.shutdown()
        took = _wait_gone(dom, 60)
        print(f"x86_64 ACPI shutdown took {took:.1f}s")
        assert serial.count("^CNA-GUEST-POWEROFF$") == 2


@pytest.mark.slow
@pytest.mark.needs_root
def test_aarch64_guest_numa_and_power_key(embedded_libvirt, test_guest, tmp_path: Path) -> None:
    guest = test_guest("aarch64")
    log, sock = tmp_path / "serial.log", tmp_path / "serial.sock"
    xml = domain_xml("cna-arm", guest, serial_log=log, serial_socket=sock, vcpus=4, numa_cells=2)
    assert "<gic version='3'/>" in xml and "cortex-a57" in xml
    t0 = time.monotonic()
    dom = embedded_libvirt.createXML(xml, 0)
    serial = SerialLog(log)
    with ConsoleSocket(sock) as con:
        serial.wait_for(r"^CNA-GUEST-READY boot=1$", timeout=120)
        print(f"aarch64 marker after {time.monotonic() - t0:.1f}s")
        f = facts(serial.text())
        assert f["arch"] == "aarch64" and f["cpus"] == "4"
        assert f["numa_nodes"] == "2" and f["node0.cpus"] == "0-1" and f["node1.cpus"] == "2-3"
        assert f["midr_el1"].endswith("411fd070")  # Cortex-A57
        con.wait_for(r"cna# ", timeout=10, partial=True)
        rc, out = con.run("ls -d /sys/devices/system/node/node* | wc -l")
        assert rc == 0 and out.strip() == "2"

        dom.shutdown()  # QEMU virt: PL061 GPIO power key
        took = _wait_gone(dom, 60)
        print(f"aarch64 shutdown took {took:.1f}s")
        assert serial.count("^CNA-GUEST-POWEROFF$") == 1


@pytest.mark.needs_root
def test_ovs_netdev_bridge(testbed) -> None:
    db = f"--db={testbed.ovsdb_remote}"

    def vsctl(*args: str) -> str:
        p = subprocess.run(["ovs-vsctl", db, "--timeout=20", *args], capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        return p.stdout

    vsctl("--may-exist", "add-br", "cnatest0", "--", "set", "bridge", "cnatest0", "datapath_type=netdev")
    try:
        out = json.loads(vsctl("--format=json", "--columns=name,datapath_type", "list", "Bridge", "cnatest0"))
        assert out["data"][0][0] == "cnatest0" and out["data"][0][1] == "netdev"
        vsctl("add-port", "cnatest0", "p1", "tag=100", "--", "set", "interface", "p1", "type=internal")
        assert vsctl("list-ports", "cnatest0").split() == ["p1"]
    finally:
        vsctl("--if-exists", "del-br", "cnatest0")
    assert "cnatest0" not in vsctl("list-br").split()


@pytest.mark.needs_root
def test_tgtd_serves_file_lun(testbed, tmp_path: Path) -> None:
    lun = tmp_path / "lun1.img"
    with lun.open("wb") as f:
        f.truncate(64 * 1024 * 1024)
    iqn = "iqn.2024-01.org.cna-agent:testbed"
    env_lines = testbed.env()
    assert env_lines["CNA_TESTBED_ISCSI_PORTAL"] == "127.0.0.1:3260"
    testbed.iscsi_create_target(iqn, [lun])
    try:
        p = subprocess.run(["iscsi-ls", "-s", "iscsi://127.0.0.1"], capture_output=True, text=True, timeout=30)
        assert p.returncode == 0 and iqn in p.stdout, p.stderr
        p = subprocess.run(["qemu-img", "info", "--output=json", f"iscsi://127.0.0.1/{iqn}/1"],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["virtual-size"] == 64 * 1024 * 1024
    finally:
        testbed.iscsi_delete_target(iqn)
    assert iqn not in testbed.iscsi_targets()
