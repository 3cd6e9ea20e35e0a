"""VM specs for tests that render or validate domains without a hypervisor (the placement
rendering tests in unit/ and their define-on-QEMU twin in integration/ share these)."""

from __future__ import annotations

from cna_agent.compute.render import RenderContext
from cna_agent.compute.spec import BootSpec, ConsoleSpec, VmSpec
from cna_agent.compute.spec_validation import ValidationContext, validate

PLACED_UUID = "0b5c2f8e-3d41-4a9b-8c7e-6f5a4b3c2d1e"
# No QMP side channel: these domains are rendered, not run by the agent.
ARM = RenderContext(host_arch="aarch64", virt_type="kvm", state_dir="/var/lib/cna-agent", run_dir="/run/cna-agent",
                    agent_version="test", qmp_side_channel=False)
X86 = RenderContext(host_arch="x86_64", virt_type="kvm", state_dir="/var/lib/cna-agent", run_dir="/run/cna-agent",
                    agent_version="test", qmp_side_channel=False)


def placed_spec(arch: str, vcpus: int, memory_mib: int, **kw) -> VmSpec:
    """A direct-boot spec named "placed", validated for a 192-CPU host with a placer."""
    kernel = "/img/Image" if arch == "aarch64" else "/img/vmlinuz"
    spec = VmSpec(name="placed", uuid=PLACED_UUID, arch=arch, vcpus=vcpus, memory_mib=memory_mib,
                  console=ConsoleSpec(type="none"), boot=BootSpec(kernel=kernel), **kw)
    ctx = ARM if arch == "aarch64" else X86
    validate(spec, ValidationContext(host_arch=ctx.host_arch, virt_type=ctx.virt_type, host_cpus=192, have_placer=True))
    return spec
