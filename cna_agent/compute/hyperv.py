"""Which Hyper-V enlightenments a Windows-family VM gets on this host, and what it is told it lost.

Why a module of its own: the full set is what Windows wants under KVM (markedly faster, and its
clock keeps time), but QEMU without KVM refuses some outright ("kernel doesn't allow setting
HyperV VP_INDEX") and accepts others only as CPUID bits: TCG emulates none of the Hyper-V MSRs,
so a guest told it has a synthetic timer or the reference clock would fault on first use. The
choice is made from the hypervisor's own answer (the ``<hyperv>`` enum of libvirt's domain
capabilities, kept in the hypervisor facts) and the virt type, in one place, so rendering and
GetVm's report of what was left out can never disagree.
"""

from __future__ import annotations

from typing import Iterable

#: What the agent gives a Windows-family VM under KVM (libvirt's feature names), in XML order.
WANTED = ("relaxed", "vapic", "spinlocks", "vpindex", "runtime", "synic", "stimer", "reset", "frequencies",
          "tlbflush", "ipi")
#: Enlightenments that are only CPUID hints (no MSR behind them): the ones a guest can be given
#: without KVM.
WITHOUT_KVM = frozenset({"relaxed", "spinlocks"})
#: QEMU's dependencies: a feature is dropped with what it needs ("Hyper-V synic requires
#: Hyper-V VP_INDEX"; the synthetic timers need synic and the reference clock, which libvirt
#: renders as the hypervclock timer and which exists under KVM only).
NEEDS = {"synic": ("vpindex",), "stimer": ("synic", "vpindex"), "tlbflush": ("vpindex",), "ipi": ("vpindex",)}


def offered(virt_type: str, host_features: Iterable[str] | None) -> frozenset[str]:
    """The enlightenments to render: WANTED, limited to what libvirt's domain capabilities list
    (``host_features``; None when this libvirt does not say, then all of WANTED) and, without
    KVM, to the CPUID-only hints; then closed under QEMU's dependencies."""
    offer = set(WANTED) if host_features is None else set(WANTED) & set(host_features)
    kvm = virt_type == "kvm"
    if not kvm:
        offer &= WITHOUT_KVM
        offer.discard("stimer")  # needs the reference clock (hypervclock): KVM only
    changed = True
    while changed:
        changed = False
        for feat, needs in NEEDS.items():
            if feat in offer and not all(n in offer for n in needs):
                offer.discard(feat)
                changed = True
    return frozenset(offer)


def clock_offered(virt_type: str) -> bool:
    """The Hyper-V reference clock (``<timer name='hypervclock'>``): KVM only."""
    return virt_type == "kvm"


def crash_msrs_offered(virt_type: str) -> bool:
    """The Hyper-V crash MSRs (``<panic model='hyperv'>``): KVM only; elsewhere the ISA pvpanic
    device reports a guest panic instead."""
    return virt_type == "kvm"


def limitations(virt_type: str, host_features: Iterable[str] | None, *, panic_device: bool) -> tuple[str, ...]:
    """One sentence per thing a Windows-family VM asked for implicitly and will not get here
    (empty under KVM on a host that offers everything)."""
    out: list[str] = []
    missing = [f for f in WANTED if f not in offered(virt_type, host_features)]
    why = "QEMU emulates Hyper-V only under KVM" if virt_type != "kvm" else "not in this hypervisor's domain capabilities"
    if missing:
        out.append(f"hyperv: {', '.join(missing)} left out ({why}; virt type {virt_type})")
    if not clock_offered(virt_type):
        out.append(f"clock: the hypervclock timer is left out (KVM only; virt type {virt_type})")
    if panic_device and not crash_msrs_offered(virt_type):
        out.append(f"panic: an ISA pvpanic device instead of the Hyper-V crash MSRs (KVM only; virt type {virt_type})")
    return tuple(out)
