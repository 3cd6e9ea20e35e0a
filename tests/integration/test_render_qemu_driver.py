"""Compute's builder renders a whole placement plan that the embedded QEMU driver (the one that
runs the guests) accepts: libvirt validates it against QEMU's capabilities, which the test
driver of tests/unit/test_render_placement.py does not. Opening an embedded root probes QEMU,
so this runs in a child process (one embedded root per process) on a copy of the session's
warmed capabilities cache."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from support.specs import PLACED_UUID, placed_spec

from cna_agent.compute import domxml as dx
from cna_agent.compute.spec import BootSpec
from cna_agent.compute.render import Bindings, RenderContext, build_domain
from cna_agent.compute.render_placement import apply_placement
from cna_agent.contracts import GuestNumaCell, PlacementPlan

UUID = PLACED_UUID
_spec = placed_spec


#: A child's opening of an embedded root (argv[1]) on the warmed capabilities cache.
_EMBEDDED_OPEN = """
import json, libvirt, sys
from xml.etree import ElementTree as ET
libvirt.registerErrorHandler(lambda c, e: None, None)
libvirt.virEventRegisterDefaultImpl()
from cna_agent.hypervisor import prepare_embedded_root
root = sys.argv[1]
prepare_embedded_root(root)
conn = libvirt.open('qemu:///embed?root=' + root)
"""

_EMBEDDED_DEFINE = _EMBEDDED_OPEN + """
dom = conn.defineXML(open(sys.argv[2]).read())
sys.stdout.write(dom.XMLDesc(0))
dom.undefine()
conn.close()
"""


@pytest.mark.slow
def test_the_qemu_driver_accepts_memnode_page_size_and_iothreadpin(tmp_path, libvirt_caps_cache):
    """The embedded QEMU driver (the one that runs the guests) validates against QEMU's
    capabilities, which the test driver does not: memory backends per cell, I/O threads."""
    if libvirt_caps_cache is None:
        pytest.skip("libvirt-python is not installed")
    ctx = RenderContext(host_arch="x86_64", virt_type="qemu", state_dir=str(tmp_path), run_dir=str(tmp_path / "run"),
                        agent_version="test", qmp_side_channel=False)
    spec = _spec("x86_64", 4, 4096, dedicated_cpus=True, hugepages=True, numa_cells=2)
    plan = PlacementPlan(vcpu_pins={0: (0,), 1: (1,), 2: (2,), 3: (3,)}, emulator_cpus=(4,), iothread_cpus={1: (4,)},
                         memory_nodes=(0,), guest_cells=(GuestNumaCell(0, (0, 1), 2048, 0), GuestNumaCell(1, (2, 3), 2048, 0)),
                         hugepage_kib=1048576, dedicated=True)
    dom = build_domain(spec, Bindings(kernel=spec.boot.kernel, placement=plan), ctx)
    dom.iothreads = 1
    apply_placement(dom, plan, spec)
    path = tmp_path / "d.xml"
    path.write_text(dom.to_xml())
    root = tmp_path / "embed"
    shutil.copytree(libvirt_caps_cache, root / "cache" / "qemu" / "capabilities")
    out = subprocess.run([sys.executable, "-c", _EMBEDDED_DEFINE, str(root), str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    got = dx.Domain.from_xml(out.stdout)
    assert [(p.iothread, p.cpuset) for p in got.cputune.iothreadpins] == [(1, "4")]
    assert [(m.cellid, m.nodeset) for m in got.numatune.memnodes] == [(0, "0"), (1, "0")]
    assert [p.size_kib for p in got.hugepage_pages] == [1048576]


_FREE_PORTS = _EMBEDDED_OPEN + """
out = []
for path in sys.argv[2:]:
    dom = conn.defineXML(open(path).read())
    t = ET.fromstring(dom.XMLDesc(0))
    ports = [int(c.get("index")) for c in t.findall("devices/controller[@type='pci']") if c.get("model") == "pcie-root-port"]
    used = {int(a.get("bus"), 16) for a in t.iter("address") if a.get("type") == "pci"}
    out.append(sum(1 for p in ports if p not in used))
    dom.undefine()
sys.stdout.write(json.dumps(out))
"""


@pytest.mark.slow
def test_every_device_mix_keeps_exactly_its_spare_root_ports_after_libvirt_places_it(tmp_path, libvirt_caps_cache):
    """libvirt fills empty root ports with the VM's own devices before it adds any, so the
    builder writes one port per PCIe device plus the spares (render.pcie_endpoints): after
    libvirt's placement exactly ``hotplug_slots`` ports are empty, whatever the mix (virtio and
    SCSI disks, NICs, guest agent, VNC, watchdog, balloon; Windows' SATA/e1000e; aarch64 virt)."""
    import itertools

    from cna_agent.compute.spec import ConsoleSpec, DiskSpec, NicSpec, VmSpec
    from cna_agent.contracts import DiskSourceBinding, NicBinding

    if libvirt_caps_cache is None:
        pytest.skip("libvirt-python is not installed")
    image = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True, timeout=30)
    paths, wanted = [], []
    mixes = itertools.product(["x86_64", "aarch64"], ["linux", "windows"], [0, 2], [0, 2], [False, True], ["none", "vnc"],
                              [False, True], [False, True])
    for i, (arch, family, disks, nics, agent, console, watchdog, scsi) in enumerate(mixes):
        if arch == "aarch64" and (family == "windows" or watchdog):
            continue  # no Windows on aarch64 here; virt has no i6300esb
        spare = (0, 2, 4)[i % 3]
        ctx = RenderContext(host_arch="x86_64", virt_type="qemu", state_dir=str(tmp_path), run_dir=str(tmp_path / "run"),
                            agent_version="test", qmp_side_channel=False, hotplug_slots=4)
        spec = VmSpec(name=f"mix{i}", uuid=f"0b5c2f8e-3d41-4a9b-8c7e-6f5a4b{i:06x}", arch=arch, vcpus=1, memory_mib=128,
                      os_family=family, disks=[DiskSpec(volume=f"x{j}", bus="scsi" if scsi else "") for j in range(disks)],
                      nics=[NicSpec(port_group="p", mac=f"52:54:00:00:{i:02x}:{j:02x}") for j in range(nics)],
                      console=ConsoleSpec(type=console), guest_agent=agent, watchdog=watchdog, balloon=True,
                      boot=BootSpec(kernel="/img/k") if arch == "aarch64" else BootSpec(), hotplug_slots=spare)
        b = Bindings(disks=[DiskSourceBinding(kind="file", path=str(image), format="qcow2")] * disks,
                     nics=[NicBinding(kind="linux-bridge", bridge="br0", port_group="p")] * nics,
                     kernel="/img/k" if arch == "aarch64" else "")
        path = tmp_path / f"mix{i}.xml"
        path.write_text(build_domain(spec, b, ctx).to_xml())
        paths.append(str(path))
        wanted.append(spare)
    root = tmp_path / "embed"
    shutil.copytree(libvirt_caps_cache, root / "cache" / "qemu" / "capabilities")
    out = subprocess.run([sys.executable, "-c", _FREE_PORTS, str(root), *paths], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    import json

    assert json.loads(out.stdout) == wanted
