"""Hyper-V enlightenments follow the hypervisor (compute/hyperv.py): the full set under KVM, what
QEMU accepts without KVM under TCG, and GetVm's limitations say what was left out.

The TCG domain is also started on the embedded driver in tests/e2e/test_vm_production.py; here
the rendering rules, on the model and through virt-xml-validate.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from cna_agent.compute import hyperv
from cna_agent.compute.render import Bindings, RenderContext, build_domain, host_limitations, render_xml
from cna_agent.compute.spec import DiskSpec, VmSpec
from cna_agent.contracts import DiskSourceBinding
from support.xml import schema_check

KVM = RenderContext(host_arch="x86_64", virt_type="kvm", state_dir="/var/lib/cna-agent", run_dir="/run/cna-agent",
                    agent_version="test", qmp_side_channel=False)
#: What libvirt 9.0's domain capabilities list on this test machine (its KVM cannot be probed).
THIS_HOST_DOMCAPS = ("spinlocks", "vendor_id")
TCG = replace(KVM, virt_type="qemu", hyperv_features=THIS_HOST_DOMCAPS)


def _windows(**kw) -> tuple[VmSpec, Bindings]:
    spec = VmSpec(name="win", uuid="6f1c3a52-8d0e-4b7a-9c1d-2e3f4a5b6c7e", os_family="windows", vcpus=2, memory_mib=1024,
                  disks=[DiskSpec(volume="ds/win.qcow2", boot_order=1)], **kw)
    return spec, Bindings(disks=[DiskSourceBinding(kind="file", path="/srv/win.qcow2", format="qcow2")])


def _on(dom) -> set[str]:
    hv = dom.features.hyperv
    return set() if hv is None else {f for f in hyperv.WANTED if getattr(hv, f)}


def test_kvm_keeps_the_full_set_clock_and_crash_msrs() -> None:
    spec, b = _windows(panic_device=True)
    dom = build_domain(spec, b, KVM)
    assert _on(dom) == set(hyperv.WANTED)
    assert dom.features.hyperv.spinlock_retries == 8191
    assert any(t.name == "hypervclock" for t in dom.clock.timers)
    assert dom.devices.panics[0].model == "hyperv"
    assert host_limitations(spec, KVM) == ()


def test_tcg_renders_only_what_qemu_takes_without_kvm_and_says_what_is_missing(tmp_path: Path) -> None:
    spec, b = _windows(panic_device=True)
    dom = build_domain(spec, b, TCG)
    assert _on(dom) == {"spinlocks"}  # relaxed is a CPUID hint too, but this host's libvirt does not offer it
    assert not any(t.name == "hypervclock" for t in dom.clock.timers)
    assert dom.clock.offset == "localtime"  # the Windows clock convention stays
    assert dom.devices.panics[0].model == "isa"
    schema_check(tmp_path, render_xml(spec, b, TCG), "domain", "windows-tcg")
    lim = host_limitations(spec, TCG)
    assert len(lim) == 3
    assert lim[0].startswith("hyperv: relaxed, vapic, vpindex, runtime, synic, stimer, reset, frequencies, tlbflush, ipi left out")
    assert "hypervclock" in lim[1] and "pvpanic" in lim[2]


def test_a_domcaps_list_without_vpindex_drops_what_needs_it_under_kvm() -> None:
    on = hyperv.offered("kvm", ("relaxed", "vapic", "spinlocks", "synic", "stimer", "tlbflush", "ipi", "runtime"))
    assert on == {"relaxed", "vapic", "spinlocks", "runtime"}
    assert hyperv.offered("kvm", None) == set(hyperv.WANTED)
    assert hyperv.offered("qemu", None) == {"relaxed", "spinlocks"}
    assert hyperv.offered("qemu", ()) == frozenset()


def test_linux_guests_have_no_hyperv_and_no_limitations() -> None:
    spec, b = _windows()
    spec.os_family = "linux"
    assert build_domain(spec, b, TCG).features.hyperv is None
    assert host_limitations(spec, TCG) == ()
