"""Every operation kind the agent journals has a recovery handler: after a crash, none is
closed with the runner's generic "not redone and its effect was not verified" verdict.

The kinds are those with a declared response type (api/results.py: the runner refuses to finish
an operation of any other kind); the handlers are the ones the wiring hands the runner at
start-up (wiring/agent.py): compute's (Compute.recovery_handlers), storage's, network's and the
host evacuation's. Only the handler maps are built, so the collaborators are not needed."""

from __future__ import annotations

from types import SimpleNamespace

from cna_agent.api.results import OPERATION_RESPONSES
from cna_agent.compute.evacuation import HostEvacuation
from cna_agent.compute.migration_cold import ColdMigrations
from cna_agent.compute.recovery import VmRecovery
from cna_agent.compute.recycle import RecycleBin
from cna_agent.compute.appliances import VmAppliances
from cna_agent.compute.guest_passwords import GuestPasswords
from cna_agent.compute.backup import VmBackups
from cna_agent.compute.disk_move import DiskMoves
from cna_agent.compute.hibernate import VmHibernation
from cna_agent.compute.hibernate_handoff import HibernationHandoff
from cna_agent.compute.service import Compute
from cna_agent.compute.templates import VmTemplates
from cna_agent.network.recovery import NetworkRecovery
from cna_agent.storage.recovery import VolumeRecovery


def _compute_handlers() -> dict:
    ops = SimpleNamespace(hv=None)
    cold = ColdMigrations(ops, None, None, None, None)  # type: ignore[arg-type]
    bin_ = RecycleBin(ops, purge=None, release=None)  # type: ignore[arg-type]
    ops.inventory = None
    hibernation = VmHibernation(ops, None, None, None, host_uuid="h")  # type: ignore[arg-type]
    parts = SimpleNamespace(recovery=VmRecovery(None, None), ops=ops, inventory=None,  # type: ignore[arg-type]
                            migrations=SimpleNamespace(hv=None, cold=cold), recycle_bin=bin_,
                            handoff=HibernationHandoff(hibernation), backups=VmBackups(ops, None),  # type: ignore[arg-type]
                            disk_moves=DiskMoves(ops, None),  # type: ignore[arg-type]
                            appliances=VmAppliances(ops, None, None, None),  # type: ignore[arg-type]
                            guest_passwords=GuestPasswords(ops, None),  # type: ignore[arg-type]
                            templates=VmTemplates(ops, None, None))  # type: ignore[arg-type]
    return Compute.recovery_handlers(parts)  # type: ignore[arg-type]


def test_every_journalled_operation_kind_has_a_recovery_handler() -> None:
    handlers = {**VolumeRecovery(None).handlers(), **NetworkRecovery(None).handlers(),  # type: ignore[arg-type]
                **_compute_handlers(),
                **HostEvacuation(None, None, None, None, max_parallel=1).recovery_handlers()}  # type: ignore[arg-type]
    missing = sorted(set(OPERATION_RESPONSES) - set(handlers))
    assert not missing, f"no recovery handler for {missing}"
    assert all(callable(h) for h in handlers.values())
