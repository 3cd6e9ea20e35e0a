"""Closing VM operations a crashed agent left open: decided from libvirt's state now, never
redone (DESIGN.md "Restart adopts, never redoes"). The runner calls these at start-up, by
operation kind (recovery_handlers). An operation whose effect is there ends with the result it
would have returned (the VM as it is now; nothing for a delete); one whose effect is not there
ends ABORTED with what libvirt shows instead, so partial effects are stated, not hidden."""

from __future__ import annotations

from typing import Any, Callable

import libvirt

from cna_agent.compute.disks import disk_element
from cna_agent.compute.inventory import VmInventory, presence
from cna_agent.compute.lifecycle import left_stopped
from cna_agent.compute.recycle import read_mark
from cna_agent.compute.spec import VmSpec
from cna_agent.compute.vmops import save_spec
from cna_agent.errors import CODES
from cna_agent.hypervisor import Hypervisor
from cna_agent.operations import RecoveryHandler
from cna_agent.state.eventlog import EventHub
from cna_agent.state.journal import OperationError, OperationRecord


class VmRecovery:
    def __init__(self, hypervisor: Hypervisor, inventory: VmInventory, events: EventHub | None = None) -> None:
        self.hv = hypervisor
        self.inventory = inventory
        #: The event log: a reboot leaves no state in libvirt, only its reboot event (vm.reboot).
        self.events = events

    def handlers(self) -> dict[str, RecoveryHandler]:
        return {"vm.create": self.recover_create, "vm.start": self.recover_start,
                "vm.shutdown": self.recover_shutdown, "vm.delete": self.recover_delete,
                "vm.disk.attach": self.recover_disk_attach, "vm.disk.detach": self.recover_disk_detach,
                "vm.pause": self.recover_pause, "vm.resume": self.recover_resume, "vm.reboot": self.recover_reboot}

    async def _now(self, uuid: str) -> tuple[bool, bool]:
        """(defined, running) as libvirt says now."""
        return await self.hv.call(lambda conn: presence(conn, uuid), timeout=10)

    async def _by_state(self, record: OperationRecord, done: Callable[[bool, bool], bool], what: str, *,
                        result: bool = True) -> Any:
        """The VM (or nothing) when libvirt shows the effect, else ABORTED saying what it shows."""
        exists, active = await self._now(record.target)
        if done(exists, active):
            return await self.inventory.get(record.target) if result and exists else None
        shows = "running" if active else "defined and stopped" if exists else "not defined"
        return OperationError(CODES["ABORTED"], f"the agent stopped before {what}; libvirt shows the VM {shows} "
                                                "(nothing was redone)")

    async def recover_create(self, record: OperationRecord) -> Any:
        """A vm.create cut short by an agent crash succeeded iff the domain exists now (and, for
        a create-and-start, runs: one defined but not started is said to be left stopped)."""
        if record.metadata.get("start") != "true":
            return await self._by_state(record, lambda exists, active: exists, "the VM was defined")
        exists, active = await self._now(record.target)
        if exists and not active:
            name = (await self.inventory.definition(record.target)).name
            return OperationError(CODES["ABORTED"], f"the agent stopped before the VM was started; {left_stopped(name)}")
        return await self._by_state(record, lambda exists, active: exists and active, "the VM was defined and started")

    async def recover_start(self, record: OperationRecord) -> Any:
        return await self._by_state(record, lambda exists, active: exists and active, "the VM was started")

    async def recover_shutdown(self, record: OperationRecord) -> Any:
        return await self._by_state(record, lambda exists, active: exists and not active, "the VM was shut down")

    async def _paused(self, uuid: str) -> bool:
        def read(conn: libvirt.virConnect) -> bool:
            try:
                return conn.lookupByUUIDString(uuid).state()[0] == libvirt.VIR_DOMAIN_PAUSED
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return False
                raise

        return await self.hv.call(read, timeout=10)

    async def recover_pause(self, record: OperationRecord) -> Any:
        paused = await self._paused(record.target)
        return await self._by_state(record, lambda exists, active: exists and active and paused, "the VM was paused")

    async def recover_resume(self, record: OperationRecord) -> Any:
        paused = await self._paused(record.target)
        return await self._by_state(record, lambda exists, active: exists and active and not paused, "the VM was resumed")

    async def recover_reboot(self, record: OperationRecord) -> Any:
        """A reboot cut short. libvirt keeps no mark of a reboot in the domain's state, so the
        evidence is: libvirt's reboot event for the VM since the request (the event log keeps
        it), or a hard reset that libvirt answered (QEMU resets before it answers; the
        operation notes the answer). A power-button press that was answered may still be
        ignored by the guest, so without the event it is not reported done."""
        exists, active = await self._now(record.target)
        if not active:
            return await self._by_state(record, lambda exists, active: False, "the VM was rebooted")
        asked = "asked_at" in record.metadata
        if await self._reboot_seen(record) or (asked and record.metadata.get("hard") == "true"):
            return await self.inventory.get(record.target)
        if asked:
            return OperationError(CODES["ABORTED"], "the agent stopped after the guest's power button was pressed; no "
                                                    "reboot was seen before it stopped and libvirt keeps no record of one; "
                                                    "the VM runs (RebootVm with a new request id restarts it; nothing was "
                                                    "redone)")
        return OperationError(CODES["ABORTED"], "the agent stopped before libvirt was seen to take the reboot; no reboot "
                                                "was seen and the VM runs (nothing was redone)")

    async def _reboot_seen(self, record: OperationRecord) -> bool:
        if self.events is None:
            return False
        seen = await self.events.list(0, types=["vm.reboot"], resource_id=record.target, limit=10_000)
        return any(e.time >= record.create_time for e in seen)

    async def recover_delete(self, record: OperationRecord) -> Any:
        if not record.metadata.get("hold_s"):
            return await self._by_state(record, lambda exists, active: not exists, "the VM was deleted", result=False)

        # A delete into the recycle bin: done exactly when the definition carries the mark.
        def read(conn: libvirt.virConnect) -> tuple[bool, bool, bool]:
            try:
                dom = conn.lookupByUUIDString(record.target)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return False, False, False
                raise
            return True, bool(dom.isActive()), read_mark(dom) is not None

        exists, active, marked = await self.hv.call(read, timeout=15)
        self.inventory.forget(record.target)
        if marked:
            return None
        shows = "running" if active else "defined and stopped" if exists else "not defined"
        return OperationError(CODES["ABORTED"], f"the agent stopped before the VM was moved to the recycle bin; libvirt "
                                                f"shows it {shows}, not in the bin (nothing was redone)")


    # -- disk hot-plug: libvirt's definition decides, the spec follows it ----------------------------

    async def _disk_now(self, record: OperationRecord) -> tuple[bool, bool, bool, bool] | None:
        """(running, in the live XML, in the persistent XML, persistent) for the record's disk
        target, or None when the VM is not defined any more."""
        target = record.metadata.get("disk_target", "")

        def read(conn: libvirt.virConnect) -> tuple[bool, bool, bool, bool] | None:
            try:
                dom = conn.lookupByUUIDString(record.target)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise
            running, persistent = bool(dom.isActive()), bool(dom.isPersistent())
            live = running and disk_element(dom.XMLDesc(0), target) is not None
            config = persistent and disk_element(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), target) is not None
            return running, live, config, persistent

        return await self.hv.call(read, timeout=30)

    async def _spec_follows(self, record: OperationRecord, running: bool) -> None:
        spec = VmSpec.from_json(record.metadata["spec_after"])
        await self.hv.call(lambda c: save_spec(c.lookupByUUIDString(record.target), spec, running), timeout=30)
        self.inventory.remember(record.target, spec)

    async def recover_disk_attach(self, record: OperationRecord) -> Any:
        """An attach cut short: the agent may have died between libvirt plugging the disk and the
        spec recording it (seen: attached live and persistent, the spec without it, so a detach
        answered NOT_FOUND). Where libvirt has the disk, the spec is completed to match."""
        target = record.metadata.get("disk_target", "")
        now = await self._disk_now(record) if target and "spec_after" in record.metadata else None
        if now is None:
            return OperationError(CODES["ABORTED"], "the agent stopped while attaching a disk and the VM (or the record "
                                                    "of the request) is gone; nothing was redone")
        running, live, config, persistent = now
        if not live and not config:
            return OperationError(CODES["ABORTED"], f"the agent stopped before {target} was attached; libvirt shows no such "
                                                    "disk on the VM (nothing changed, nothing was redone)")
        await self._spec_follows(record, running)
        if (running and not live) or (persistent and not config):
            where = "the persistent definition only" if config else "the running VM only"
            return OperationError(CODES["ABORTED"], f"the agent stopped while attaching {target}: libvirt has it in {where}; "
                                                    "the spec now lists it, so DetachDisk can remove it")
        return await self.inventory.get(record.target)

    async def recover_disk_detach(self, record: OperationRecord) -> Any:
        """A detach cut short: when libvirt no longer has the disk, the spec drops it too."""
        target = record.metadata.get("disk_target", "")
        now = await self._disk_now(record) if target and "spec_after" in record.metadata else None
        if now is None:
            return OperationError(CODES["ABORTED"], "the agent stopped while detaching a disk and the VM (or the record "
                                                    "of the request) is gone; nothing was redone")
        running, live, config, _persistent = now
        if live or config:
            where = "the running VM and its definition" if live and config else "the running VM" if live else "its definition"
            return OperationError(CODES["ABORTED"], f"the agent stopped while detaching {target}; libvirt still has it in "
                                                    f"{where} (the spec keeps it; retry DetachDisk)")
        await self._spec_follows(record, running)
        return await self.inventory.get(record.target)
