"""HostService's maintenance calls (SetMaintenance, GetMaintenance): proto <-> compute's
evacuation and its report. Translation only; the rules live in compute/evacuation.py."""

from __future__ import annotations

from typing import Any

from cna_agent.api import pb
from cna_agent.api.convert import operation_to_pb, request_fingerprint, timestamp
from cna_agent.api.vm_convert import migration_policy_from_pb
from cna_agent.compute.evacuation import HostEvacuation
from cna_agent.compute.maintenance import CANCELLED, MOVED, NOT_MOVED, PENDING, EvacuationReport, MaintenanceStatus
from cna_agent.errors import Unimplemented

h = pb.host_pb2
_OUTCOMES = {MOVED: h.EVACUATION_OUTCOME_MOVED, NOT_MOVED: h.EVACUATION_OUTCOME_NOT_MOVED,
             CANCELLED: h.EVACUATION_OUTCOME_CANCELLED, PENDING: h.EVACUATION_OUTCOME_PENDING}


def report_to_pb(r: EvacuationReport) -> Any:
    return h.EvacuationReport(
        operation_id=r.operation_id, start_time=timestamp(r.start_time), end_time=timestamp(r.end_time),
        moved=r.moved, not_moved=r.not_moved, complete=r.complete,
        vms=[h.EvacuatedVm(vm_uuid=v.uuid, vm_name=v.name, state=v.state, destination=v.destination,
                           outcome=_OUTCOMES.get(v.outcome, h.EVACUATION_OUTCOME_UNSPECIFIED), error=v.error,
                           operation_id=v.operation_id, operation_kind=v.operation_kind, attempts=list(v.attempts),
                           duration_ms=v.duration_ms) for v in r.vms])


def status_to_pb(s: MaintenanceStatus) -> Any:
    return h.MaintenanceStatus(enabled=s.enabled, since=timestamp(s.since), destinations=list(s.destinations),
                               evacuation_operation_id=s.evacuation_operation_id,
                               last_report=report_to_pb(s.last_report) if s.last_report is not None else None)


class MaintenanceCalls:
    """Mixed into HostServicer: the two maintenance RPCs over an optional HostEvacuation."""

    _maintenance: HostEvacuation | None

    def _evacuation(self) -> HostEvacuation:
        if self._maintenance is None:
            raise Unimplemented("this agent runs no maintenance mode")
        return self._maintenance

    async def SetMaintenance(self, request: Any, context: Any) -> Any:
        evac = self._evacuation()
        record = await evac.set_maintenance(request.enabled, list(request.destinations),
                                            migration_policy_from_pb(request.policy), request_id=request.request_id,
                                            fingerprint=request_fingerprint(request))
        return operation_to_pb(record)

    async def GetMaintenance(self, request: Any, context: Any) -> Any:
        return status_to_pb(self._evacuation().status())
