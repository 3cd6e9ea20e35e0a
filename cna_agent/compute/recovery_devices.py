"""Closing the VM's device, snapshot and update operations a crashed agent left open.

The same rule as recovery.py (DESIGN.md "Restart adopts, never redoes"): each is decided from
what libvirt shows now, compared with what the request asked for (recorded in the operation's
metadata when it was submitted), and never re-run. Where libvirt shows the change, the agent's
spec in the domain metadata is completed to match it (the crash may have come between libvirt's
change and the spec write), so GetVm, a stopped UpdateVm and the next restart all see the VM as
it is. Where it does not, the operation ends ABORTED saying what libvirt shows instead.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

import libvirt

from cna_agent.compute import snapshots as snaps
from cna_agent.compute.inventory import VmInventory
from cna_agent.compute.nics import interface_element
from cna_agent.compute.pending_changes import read_mark as read_pending_mark
from cna_agent.compute.pending_changes import write_mark as write_pending_mark
from cna_agent.compute.spec import VmSpec
from cna_agent.compute.vmops import save_spec
from cna_agent.errors import CODES
from cna_agent.hypervisor import Hypervisor
from cna_agent.operations import RecoveryHandler
from cna_agent.state.journal import OperationError, OperationRecord

log = logging.getLogger(__name__)

#: What a read returns when the VM is not defined any more.
_GONE = object()


def _aborted(message: str) -> OperationError:
    return OperationError(CODES["ABORTED"], message)


class DeviceRecovery:
    def __init__(self, hypervisor: Hypervisor, inventory: VmInventory) -> None:
        self.hv = hypervisor
        self.inventory = inventory

    def handlers(self) -> dict[str, RecoveryHandler]:
        return {"vm.disk.resize": self.recover_disk_resize, "vm.disk.qos": self.recover_disk_qos,
                "vm.update": self.recover_update,
                "network.nic.attach": self.recover_nic_attach, "network.nic.detach": self.recover_nic_detach,
                "network.nic.link": self.recover_nic_link,
                "vm.snapshot.create": self.recover_snapshot_create, "vm.snapshot.revert": self.recover_snapshot_revert,
                "vm.snapshot.delete": self.recover_snapshot_delete}

    async def _read(self, uuid: str, read: Callable[[libvirt.virDomain], Any]) -> Any:
        """``read(dom)`` in the libvirt executor, or _GONE when the VM is not defined any more."""

        def run(conn: libvirt.virConnect) -> Any:
            try:
                dom = conn.lookupByUUIDString(uuid)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return _GONE
                raise
            return read(dom)

        return await self.hv.call(run, timeout=30)

    async def _spec_follows(self, record: OperationRecord) -> Any:
        """Write the request's spec (metadata ``spec_after``) into the definition; the VM after."""
        spec = VmSpec.from_json(record.metadata["spec_after"])

        def write(dom: libvirt.virDomain) -> None:
            save_spec(dom, spec, bool(dom.isActive()))

        await self._read(record.target, write)
        self.inventory.remember(record.target, spec)
        return await self.inventory.get(record.target)

    # -- disks -----------------------------------------------------------------------------------

    async def recover_disk_resize(self, record: OperationRecord) -> Any:
        """Grown iff libvirt reports the disk at least the requested size (a grow only runs on
        a running VM; the size comes from QEMU's block layer through blockInfo)."""
        target, wanted = record.metadata.get("disk_target", ""), int(record.metadata.get("new_size_bytes", "0") or 0)
        if not target or not wanted:
            return _aborted("the agent stopped while growing a disk and the record of the request is incomplete; "
                            "nothing was redone")
        capacity = await self._read(record.target, lambda dom: dom.blockInfo(target)[0])
        if capacity is _GONE:
            return _aborted(f"the agent stopped while growing {target} and the VM is gone; nothing was redone")
        if capacity >= wanted:
            self.inventory.forget(record.target)
            return await self.inventory.get(record.target)
        return _aborted(f"the agent stopped before {target} was grown; libvirt reports {capacity} bytes, not {wanted} "
                        "(nothing was redone; repeat ResizeDisk)")

    async def recover_disk_qos(self, record: OperationRecord) -> Any:
        """Applied iff every requested limit is in force where the operation set it (live when
        the VM ran, and the persistent definition); then the spec records it."""
        target = record.metadata.get("disk_target", "")
        if not target or "spec_after" not in record.metadata:
            return _aborted("the agent stopped while setting I/O limits and the record of the request is incomplete; "
                            "nothing was redone")
        spec = VmSpec.from_json(record.metadata["spec_after"])
        disk = next((d for d in spec.disks if d.target == target), None)
        if disk is None:
            return _aborted(f"the agent stopped while setting I/O limits on {target}; nothing was redone")
        wanted = {k: int(v) for k, v in vars(disk.qos).items()}

        def read(dom: libvirt.virDomain) -> list[str]:
            places = [("the running VM", libvirt.VIR_DOMAIN_AFFECT_LIVE)] if dom.isActive() else []
            if dom.isPersistent():
                places.append(("the persistent definition", libvirt.VIR_DOMAIN_AFFECT_CONFIG))
            missing = []
            for where, flags in places:
                now = dom.blockIoTune(target, flags)
                if any(int(now.get(k, 0)) != v for k, v in wanted.items()):
                    missing.append(where)
            return missing

        missing = await self._read(record.target, read)
        if missing is _GONE:
            return _aborted(f"the agent stopped while setting I/O limits on {target} and the VM is gone; nothing was redone")
        if missing:
            return _aborted(f"the agent stopped while setting I/O limits on {target}; {' and '.join(missing)} "
                            "does not have them (nothing was redone; repeat SetDiskQos)")
        return await self._spec_follows(record)

    # -- UpdateVm --------------------------------------------------------------------------------

    async def recover_update(self, record: OperationRecord) -> Any:
        """Done iff the spec libvirt keeps has the requested fields: both paths write it last
        (the stopped one with the whole new definition, the live one after the hot-plugs), so a
        spec without them means the update did not finish. A live update may have applied a
        part (vCPUs, memory) before the crash: what the running VM has is named."""
        mask = [m for m in record.metadata.get("mask", "").split(",") if m]
        if not mask or "spec_after" not in record.metadata:
            return _aborted("the agent stopped while updating the VM and the record of the request is incomplete; "
                            "nothing was redone")
        wanted = json.loads(record.metadata["spec_after"])

        def read(dom: libvirt.virDomain) -> tuple[dict[str, Any] | None, int, int]:
            d = VmInventory.read_definition(dom)
            info = dom.info() if dom.isActive() else None
            return (json.loads(d.spec.to_json()) if d.spec else None,
                    info[3] if info else 0, info[2] // 1024 if info else 0)

        now = await self._read(record.target, read)
        if now is _GONE:
            return _aborted("the agent stopped while updating the VM and the VM is gone; nothing was redone")
        stored, vcpus, memory_mib = now
        if stored is not None and all(stored.get(m) == wanted.get(m) for m in mask):
            waiting = [f for f in record.metadata.get("waiting", "").split(",") if f]
            if waiting:
                # the definition for the next start was written; its mark may not have been (the
                # process it names: a VM restarted since has them applied, and the mark is stale)
                await self._read(record.target, lambda dom: read_pending_mark(dom) is None
                                 and write_pending_mark(dom, waiting, record.metadata.get("qemu", "")))
            self.inventory.forget(record.target)
            return await self.inventory.get(record.target)
        self.inventory.forget(record.target)
        live = f"; the running VM has {vcpus} vCPUs and {memory_mib} MiB" if vcpus else ""
        return _aborted(f"the agent stopped before the update of {', '.join(mask)} was recorded; the spec is the previous "
                        f"one{live} (nothing was redone; repeat UpdateVm)")

    # -- NICs ------------------------------------------------------------------------------------

    async def _nic_places(self, record: OperationRecord) -> Any:
        """(running, live interface, persistent interface) for the record's MAC, or _GONE."""
        mac = record.metadata.get("nic_mac", "").lower()

        def read(dom: libvirt.virDomain) -> tuple[bool, Any, Any]:
            running = bool(dom.isActive())
            live = interface_element(dom.XMLDesc(0), mac) if running else None
            config = interface_element(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), mac) if dom.isPersistent() else None
            return running, live, config

        return await self._read(record.target, read)

    async def _nic_result(self, record: OperationRecord) -> Any:
        await self._spec_follows(record)
        mac = record.metadata.get("nic_mac", "").lower()
        for nic in await self.inventory.vm_nics(record.target):
            if nic.mac == mac:
                return nic
        return _aborted(f"NIC {mac} is in libvirt's definition but not among the VM's NICs")

    async def recover_nic_attach(self, record: OperationRecord) -> Any:
        """Plugged iff libvirt has an interface with the MAC (labels and guards on its port are
        the network reconcile's, which repairs every VM's ports)."""
        mac = record.metadata.get("nic_mac", "")
        places = await self._nic_places(record) if mac and "spec_after" in record.metadata else _GONE
        if places is _GONE:
            return _aborted("the agent stopped while attaching a NIC and the VM (or the record of the request) is gone; "
                            "nothing was redone")
        _running, live, config = places
        if live is None and config is None:
            return _aborted(f"the agent stopped before NIC {mac} was attached; libvirt shows no such NIC "
                            "(nothing changed, nothing was redone)")
        return await self._nic_result(record)

    async def recover_nic_detach(self, record: OperationRecord) -> Any:
        mac = record.metadata.get("nic_mac", "")
        places = await self._nic_places(record) if mac and "spec_after" in record.metadata else _GONE
        if places is _GONE:
            return _aborted("the agent stopped while detaching a NIC and the VM (or the record of the request) is gone; "
                            "nothing was redone")
        _running, live, config = places
        if live is not None or config is not None:
            where = "the running VM" if live is not None else "its definition"
            return _aborted(f"the agent stopped while detaching NIC {mac}; libvirt still has it in {where} "
                            "(the spec keeps it; retry DetachNic)")
        await self._spec_follows(record)
        return None

    async def recover_nic_link(self, record: OperationRecord) -> Any:
        mac, link = record.metadata.get("nic_mac", ""), record.metadata.get("link", "")
        places = await self._nic_places(record) if mac and link else _GONE
        if places is _GONE:
            return _aborted("the agent stopped while changing a NIC's link and the VM (or the record) is gone; "
                            "nothing was redone")
        running, live, config = places
        states = [i.link_state or "up" for i in (live, config) if i is not None]
        if not states:
            return _aborted(f"the agent stopped while changing the link of NIC {mac}, which libvirt no longer has")
        if all(s == link for s in states):
            return await self._nic_result(record)
        return _aborted(f"the agent stopped before the link of NIC {mac} was set {link}; libvirt shows it "
                        f"{'/'.join(states)} (nothing was redone; repeat SetNicLink)")

    # -- snapshots -------------------------------------------------------------------------------

    async def _tree(self, uuid: str) -> Any:
        return await self._read(uuid, snaps.list_tree)

    async def recover_snapshot_create(self, record: OperationRecord) -> Any:
        """Taken iff libvirt lists the snapshot (libvirtd finishes a snapshot its caller left)."""
        name = record.metadata.get("snapshot", "")
        tree = await self._tree(record.target) if name else _GONE
        if tree is _GONE:
            return _aborted("the agent stopped while taking a snapshot and the VM (or the record) is gone; nothing was redone")
        found = next((s for s in tree if s.name == name), None)
        self.inventory.forget(record.target)  # an external snapshot changed the disk sources
        if record.metadata.get("quiesce") == "true":
            await self._thaw(record.target)
        if found is not None:
            return found
        return _aborted(f"the agent stopped before snapshot {name!r} was taken; libvirt has no such snapshot "
                        "(nothing was redone; repeat CreateSnapshot)")

    async def _thaw(self, uuid: str) -> None:
        """A quiesced snapshot cut short may have left the guest's filesystems frozen: libvirt
        thaws inside the same call, and under the embedded driver that call died with the agent.
        Thawing filesystems that are not frozen does nothing, so it is always asked; a guest
        agent that does not answer is logged (the guest thaws when its agent restarts)."""
        def thaw(conn: libvirt.virConnect) -> int:
            dom = conn.lookupByUUIDString(uuid)
            return dom.fsThaw() if dom.isActive() else 0

        try:
            n = await self.hv.call(thaw, timeout=15, what="thawing the guest's filesystems")
            log.warning("event=vm.fs_thawed_after_crash vm=%s filesystems=%d", uuid, n)
        except Exception as exc:
            log.warning("event=vm.fs_thaw_failed vm=%s error=%r", uuid, getattr(exc, "message", None) or str(exc))

    async def recover_snapshot_revert(self, record: OperationRecord) -> Any:
        """Reverted iff libvirt's current snapshot became the one asked for (it was another one,
        or none, when the request came; one that already was current is judged by that)."""
        name, before = record.metadata.get("snapshot", ""), record.metadata.get("current_before", "")
        tree = await self._tree(record.target) if name else _GONE
        if tree is _GONE:
            return _aborted("the agent stopped while reverting to a snapshot and the VM (or the record) is gone; "
                            "nothing was redone")
        current = next((s.name for s in tree if s.current), "")
        self.inventory.forget(record.target)
        if current == name and before != name:
            return await self.inventory.get(record.target)
        if current == name:
            return _aborted(f"the agent stopped while reverting to {name!r}, which was already the current snapshot; "
                            "whether the revert ran cannot be told (nothing was redone; repeat RevertSnapshot)")
        return _aborted(f"the agent stopped before the VM was reverted to {name!r}; the current snapshot is "
                        f"{current or 'none'} (nothing was redone; repeat RevertSnapshot)")

    async def recover_snapshot_delete(self, record: OperationRecord) -> Any:
        name = record.metadata.get("snapshot", "")
        tree = await self._tree(record.target) if name else _GONE
        if tree is _GONE:
            return None if name else _aborted("the agent stopped while deleting a snapshot; the record is incomplete")
        if any(s.name == name for s in tree):
            return _aborted(f"the agent stopped before snapshot {name!r} was deleted; libvirt still has it "
                            "(nothing was redone; repeat DeleteSnapshot)")
        return None
