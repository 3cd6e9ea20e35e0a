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

from cna_agent.compute import domxml as dx
from cna_agent.compute.render import Bindings, RenderContext, apply_placement, build_domain
from cna_agent.compute.spec import BootSpec, ConsoleSpec, ValidationContext, VmSpec, validate
from cna_agent.contracts import GuestNumaCell, PlacementPlan

UUID = "0b5c2f8e-3d41-4a9b-8c7e-6f5a4b3c2d1e"
# The spec is validated as in tests/unit/test_render_placement.py (same contexts, same _spec);
# it is rendered below with a context of its own.
ARM = RenderContext(host_arch="aarch64", virt_type="kvm", state_dir="/var/lib/cna-agent", run_dir="/run/cna-agent",
                    agent_version="test", qmp_side_channel=False)
X86 = RenderContext(host_arch="x86_64", virt_type="kvm", state_dir="/var/lib/cna-agent", run_dir="/run/cna-agent",
                    agent_version="test", qmp_side_channel=False)


def _spec(arch: str, vcpus: int, memory_mib: int, **kw) -> VmSpec:
    kernel = "/img/Image" if arch == "aarch64" else "/img/vmlinuz"
    spec = VmSpec(name="placed", uuid=UUID, arch=arch, vcpus=vcpus, memory_mib=memory_mib, console=ConsoleSpec(type="none"),
                  boot=BootSpec(kernel=kernel), **kw)
    ctx = ARM if arch == "aarch64" else X86
    validate(spec, ValidationContext(host_arch=ctx.host_arch, virt_type=ctx.virt_type, host_cpus=192, have_placer=True))
    return spec


_EMBEDDED_DEFINE = """
import libvirt, sys
libvirt.registerErrorHandler(lambda c, e: None, None)
libvirt.virEventRegisterDefaultImpl()
from cna_agent.hypervisor import prepare_embedded_root
root = sys.argv[1]
prepare_embedded_root(root)
conn = libvirt.open('qemu:///embed?root=' + root)
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
