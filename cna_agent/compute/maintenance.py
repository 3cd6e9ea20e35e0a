"""Host maintenance mode: whether this host takes new VMs, kept across agent restarts, and the
per-VM report of the last evacuation.

Why its own small part: the mode is asked for by three flows that otherwise share nothing
(create, start, an incoming migration), and it must hold from the moment maintenance is turned
on, before the first VM moves and while the agent restarts. So it is one object with the state
in the agent's SQLite key-value table (state/store.py), read once at start-up and written
through on each change; compute's lifecycle and the destination side of migration reach it as
contracts.HostAdmission, and the evacuation (evacuation.py) drives it.

FusionCompute's behaviour is the model: a host in maintenance refuses VM creation and power-on,
is not chosen as a migration destination, and keeps the VMs it still runs running.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

from cna_agent.errors import FailedPrecondition
from cna_agent.state.store import StateStore

log = logging.getLogger(__name__)

MODE_KEY = "host.maintenance"
REPORT_KEY = "host.maintenance.report"

MOVED, NOT_MOVED, CANCELLED, PENDING = "moved", "not_moved", "cancelled", "pending"
OUTCOMES = (MOVED, NOT_MOVED, CANCELLED, PENDING)


@dataclass
class EvacuatedVm:
    """One VM's line in the report: where it went, or why it stayed."""

    uuid: str
    name: str
    state: str
    memory_mib: int = 0
    destination: str = ""
    outcome: str = PENDING
    error: str = ""
    operation_id: str = ""
    operation_kind: str = ""
    attempts: list[str] = field(default_factory=list)
    duration_ms: int = 0


@dataclass
class EvacuationReport:
    operation_id: str
    start_time: float
    end_time: float | None = None
    vms: list[EvacuatedVm] = field(default_factory=list)

    @property
    def moved(self) -> int:
        return sum(1 for v in self.vms if v.outcome == MOVED)

    @property
    def not_moved(self) -> int:
        return sum(1 for v in self.vms if v.outcome in (NOT_MOVED, CANCELLED))

    @property
    def done(self) -> int:
        return sum(1 for v in self.vms if v.outcome != PENDING)

    @property
    def complete(self) -> bool:
        return self.end_time is not None and self.moved == len(self.vms)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EvacuationReport":
        data = json.loads(text)
        vms = [EvacuatedVm(**v) for v in data.pop("vms", [])]
        return cls(vms=vms, **data)


@dataclass(frozen=True)
class MaintenanceState:
    enabled: bool = False
    since: float | None = None
    destinations: tuple[str, ...] = ()


@dataclass(frozen=True)
class MaintenanceStatus:
    """What GetMaintenance answers (and "host.maintenance.exit" returns)."""

    enabled: bool
    since: float | None
    destinations: tuple[str, ...]
    evacuation_operation_id: str
    last_report: EvacuationReport | None


class MaintenanceMode:
    """The mode and the last report, persisted in the state database (implements
    contracts.HostAdmission)."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self.state = MaintenanceState()
        self.report: EvacuationReport | None = None

    async def load(self) -> None:
        """Read the persisted mode at start-up. A report whose evacuation was cut short by the
        agent stopping keeps its finished lines; the unfinished ones say so (the VM's own
        migration operation, closed by its recovery, tells how it ended)."""
        raw = await self._store.run(self._store.get_value, MODE_KEY)
        if raw:
            data = json.loads(raw)
            self.state = MaintenanceState(bool(data.get("enabled")), data.get("since"), tuple(data.get("destinations", ())))
        raw = await self._store.run(self._store.get_value, REPORT_KEY)
        if raw:
            report = EvacuationReport.from_json(raw)
            if report.end_time is None:
                for v in report.vms:
                    if v.outcome == PENDING:
                        v.outcome = NOT_MOVED
                        v.error = ("the agent stopped during the evacuation" +
                                   (f"; operation {v.operation_id} says whether the VM moved" if v.operation_id else
                                    " before this VM's move started"))
                report.end_time = time.time()
                await self.save_report(report)
            self.report = report
        if self.state.enabled:
            log.warning("event=maintenance.restored since=%s destinations=%s", self.state.since, ",".join(self.state.destinations))

    @property
    def enabled(self) -> bool:
        return self.state.enabled

    def check_admission(self, what: str, *, field: str) -> None:
        if self.state.enabled:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.state.since)) if self.state.since else "?"
            raise FailedPrecondition(
                f"this host is in maintenance mode (since {since}) and refuses {what}; turn maintenance off first "
                "(HostService.SetMaintenance enabled=false, cna-ctl host maintenance off)", field=field)

    async def set(self, enabled: bool, destinations: tuple[str, ...] = ()) -> MaintenanceState:
        since = (self.state.since if self.state.enabled else time.time()) if enabled else None
        state = MaintenanceState(enabled, since, tuple(destinations) if enabled else ())
        body = json.dumps({"enabled": state.enabled, "since": state.since, "destinations": list(state.destinations)})
        await self._store.run(self._store.set_value, MODE_KEY, body)
        if state.enabled != self.state.enabled:
            log.warning("event=maintenance.%s destinations=%s", "on" if enabled else "off", ",".join(state.destinations))
        self.state = state
        return state

    async def save_report(self, report: EvacuationReport) -> None:
        self.report = report
        await self._store.run(self._store.set_value, REPORT_KEY, report.to_json())
