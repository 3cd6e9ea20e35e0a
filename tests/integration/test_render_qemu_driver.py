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
from cna_agent.compute.render import (
    Bindings,
    RenderContext,
    apply_placement,
    build_domain,
)
from cna_agent.contracts import GuestNumaCell, PlacementPlan

UUID = PLACED_UUID
_spec = placed_spec


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
