"""How a subsystem (compute, storage, network, ...) plugs into the daemon.

Each subsystem package has a ``component`` module with ``async def start(ctx) -> Component``.
The daemon starts them in COMPONENT_MODULES order (placement first: compute asks it), after the shared pieces exist and before
operation recovery (so their recovery handlers are known) and before serving (so their
servicers are registered). Later components can reach earlier ones through
``ctx.components`` (storage and network need compute's VMs). Stopping runs in reverse order.

This keeps the daemon free of per-subsystem code and avoids a global registry object that
everything imports (VDSM's ``clientIF``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

if TYPE_CHECKING:
    from cna_agent.hypervisor import Hypervisor
    from cna_agent.config import AgentConfig
    from cna_agent.host.kvmprobe import KvmVerdict
    from cna_agent.host.service import HostService
    from cna_agent.operations import OperationRunner, RecoveryHandler
    from cna_agent.state.eventlog import EventHub
    from cna_agent.state.store import StateStore

#: Start order; a module that is not present in this build is skipped.
COMPONENT_MODULES: tuple[str, ...] = (
    "cna_agent.host.component",
    "cna_agent.compute.component",
    "cna_agent.storage.component",
    "cna_agent.network.component",
    "cna_agent.vrm.component",
)


@dataclass
class Component:
    name: str
    #: Full gRPC service name ("cna.v1.VmService") -> servicer instance.
    servicers: dict[str, Any] = field(default_factory=dict)
    #: Operation kind ("vm.start") -> handler closing an operation a crash left open.
    recovery_handlers: dict[str, "RecoveryHandler"] = field(default_factory=dict)
    #: The subsystem's service object, for other components (e.g. compute's VmService).
    service: Any = None
    #: Called after recovery, once serving: reconcile loops, monitors.
    after_start: Callable[[], Awaitable[None]] | None = None
    stop: Callable[[], Awaitable[None]] | None = None
    #: The subsystem's BlockingPools, for the metrics (the daemon adds them to ctx.pools).
    pools: tuple[Any, ...] = ()


@dataclass
class AgentContext:
    config: "AgentConfig"
    store: "StateStore"
    events: "EventHub"
    runner: "OperationRunner"
    hypervisor: "Hypervisor"
    host: "HostService"
    virt_type: str
    kvm: "KvmVerdict"
    components: dict[str, Component] = field(default_factory=dict)
    #: Every BlockingPool of the agent (shared ones and the components'), read by the metrics.
    pools: list[Any] = field(default_factory=list)
