"""First-boot customization of a new VM, from the drive the create attaches to when the guest
says it is done, then the drive's removal.

How the agent learns that the guest is done, without a network path into it: through the guest
agent, by reading the file the guest's first-boot tool writes at its very end. cloud-init writes
``/run/cloud-init/result.json`` (with its errors) when its last stage finishes; Windows Setup
records ``IMAGE_STATE_COMPLETE`` in ``C:\\Windows\\Setup\\State\\State.ini``. The agent polls that
file (guest-file-open/read, every ``poll_interval_s``) from the guest agent's first connection
until it appears, in the guest-agent pool, so a hung guest agent delays nothing else; then it
removes the drive from the persistent definition and from the running guest (virtio hot-unplug),
deletes the image (it holds password hashes) and records the outcome.

State is kept where it outlives the agent: a mark in the domain's persistent definition
(``pending``/``done``/``failed``, what GetVm reports) and the image file itself under
``<state>/seeds/``. An agent that restarts finds the pending VMs by listing that directory (no
libvirt call per VM) and polls the running ones again; an image whose VM is gone (a create that
died before its define) is removed. A customization is only ever applied once: the instance id
on the drive is the VM's uuid, which cloud-init keeps in its own state.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from typing import Any

import libvirt

from cna_agent.blocking import BlockingPool
from cna_agent.compute import customization as cz
from cna_agent.compute import domxml as dx
from cna_agent.compute import seed_drive
from cna_agent.compute import state as st
from cna_agent.compute.guest_agent import READ_DEADLINE_S
from cna_agent.compute.inventory import VmInventory, presence
from cna_agent.compute.customization_mark import (CUSTOMIZATION_KEY, CUSTOMIZATION_NS, DONE, FAILED, PENDING,
                                                  CustomizationMark, read_mark)
from cna_agent.compute.marks import write_metadata
from cna_agent.compute.spec import VmSpec
from cna_agent.errors import AgentError, FailedPrecondition
from cna_agent.hypervisor import Hypervisor
from cna_agent.qemu_access import QemuUser
from cna_agent.state.eventlog import EventHub

log = logging.getLogger(__name__)

LINUX_REPORT = "/run/cloud-init/result.json"
WINDOWS_REPORT = "C:\\Windows\\Setup\\State\\State.ini"
MAX_REPORT = 65536


def parse_report(os_kind: str, text: str) -> tuple[str, str]:
    """(state, message) from the guest's report: DONE, or FAILED with the tool's own errors."""
    if os_kind == "windows":
        if "IMAGE_STATE_COMPLETE" in text:
            return DONE, "Windows Setup completed"
        return PENDING, ""
    try:
        errors = json.loads(text).get("v1", {}).get("errors", [])
    except (ValueError, AttributeError):
        return PENDING, ""  # half written: read again
    if errors:
        return FAILED, "cloud-init reported: " + "; ".join(str(e) for e in errors)[:900]
    return DONE, "cloud-init finished"


def _agent(dom: libvirt.virDomain, command: str, **arguments: Any) -> Any:
    import libvirt_qemu

    out = libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": command, "arguments": arguments}),
                                        int(READ_DEADLINE_S), 0)
    return json.loads(out).get("return")


def read_guest_file(dom: libvirt.virDomain, path: str) -> str | None:
    """The guest file's text through the guest agent, or None when it does not exist (yet)."""
    try:
        handle = _agent(dom, "guest-file-open", path=path, mode="r")
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED,
                                    libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN):
            raise
        return None  # the guest agent's own error: no such file
    try:
        got = _agent(dom, "guest-file-read", handle=handle, count=MAX_REPORT)
        return base64.b64decode(got.get("buf-b64", "")).decode("utf-8", "replace")
    finally:
        try:
            _agent(dom, "guest-file-close", handle=handle)
        except libvirt.libvirtError:
            pass


def detach_seed(dom: libvirt.virDomain) -> None:
    """The drive out of the persistent definition and, while the VM runs, out of the guest."""
    disk = seed_drive.find_seed(dx.Domain.from_xml(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))
    if disk is not None:
        dom.detachDeviceFlags(disk.to_xml(), libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    if dom.isActive():
        live = seed_drive.find_seed(dx.Domain.from_xml(dom.XMLDesc(0)))
        if live is not None:
            try:  # virtio hot-unplug: the guest lets go of it (cloud-init has unmounted it)
                dom.detachDeviceFlags(live.to_xml(), libvirt.VIR_DOMAIN_AFFECT_LIVE)
            except libvirt.libvirtError as exc:
                log.info("event=vm.customization_live_detach vm=%s error=%r (gone at the next start)",
                         dom.UUIDString(), exc.get_error_message())


class FirstBoot:
    def __init__(self, hv: Hypervisor, inventory: VmInventory, events: EventHub, *, pool: BlockingPool,
                 state_dir: str, poll_interval_s: float = 5.0) -> None:
        self.hv = hv
        self.inventory = inventory
        self.events = events
        self.pool = pool
        self.state_dir = state_dir
        self.poll_interval_s = poll_interval_s
        self._polls: dict[str, asyncio.Task[None]] = {}

    # -- at create -----------------------------------------------------------------------------

    def check(self, c: cz.GuestCustomization, spec: VmSpec) -> None:
        cz.validate(c, spec)
        if not spec.guest_agent:
            raise FailedPrecondition("customization needs spec.guest_agent: the guest agent tells when first boot is "
                                     "done, and the drive is removed then", field="spec.guest_agent")

    def attach(self, dom: dx.Domain, spec: VmSpec) -> None:
        """Put the drive (its image is written by write() before the define) and a pending mark
        into the domain about to be defined; one more PCIe port carries the virtio drive."""
        windows = cz.is_windows(spec)
        assert dom.devices is not None
        pcie = any(c.model == "pcie-root" for c in dom.devices.controllers)
        dom.devices.disks.append(seed_drive.seed_disk(seed_drive.seed_path(self.state_dir, spec.uuid), windows=windows))
        if pcie and not windows:
            dom.devices.controllers.append(dx.Controller(type="pci", model="pcie-root-port"))
        mark = CustomizationMark(PENDING, "windows" if windows else "linux", time.time())
        dom.metadata = [*(dom.metadata or []), mark.to_element()]

    async def write(self, c: cz.GuestCustomization, spec: VmSpec, qemu: QemuUser | None) -> None:
        if cz.is_windows(spec):
            files, label = cz.unattend_files(c), seed_drive.WINDOWS_LABEL
        else:
            files, label = cz.nocloud_files(c, spec, instance_id=spec.uuid), seed_drive.CLOUD_INIT_LABEL
        await self.pool.run(lambda: seed_drive.write_seed(self.state_dir, spec.uuid, files, label=label, qemu=qemu),
                            timeout=60, what="writing the first-boot drive")

    def discard(self, uuid: str) -> None:
        """A create that did not define its VM: its image goes."""
        seed_drive.remove_seed(self.state_dir, uuid)

    # -- events and startup --------------------------------------------------------------------

    def _pending(self, uuid: str) -> bool:
        return os.path.exists(seed_drive.seed_path(self.state_dir, uuid))

    def agent_changed(self, uuid: str, connected: bool) -> None:
        if connected and self._pending(uuid):
            self._poll(uuid)

    def vm_state_changed(self, uuid: str, state: str) -> None:
        if state == "deleted":  # undefined (events.py): deleted here, or moved to another host
            task = self._polls.pop(uuid, None)
            if task is not None:
                task.cancel()
            seed_drive.remove_seed(self.state_dir, uuid)

    async def start(self) -> None:
        """After a restart: poll the running pending VMs again; drop images of VMs that are gone."""
        try:
            names = os.listdir(os.path.join(self.state_dir, "seeds"))
        except FileNotFoundError:
            return
        for name in names:
            uuid = name[:-4] if name.endswith(".img") else ""
            if not uuid:
                continue
            defined, running = await self.hv.call(lambda c: presence(c, uuid), timeout=15)
            if not defined:
                log.info("event=vm.customization_orphan vm=%s (no such domain: its first-boot drive is removed)", uuid)
                self.discard(uuid)
            elif running:
                self._poll(uuid)

    async def stop(self) -> None:
        for task in list(self._polls.values()):
            task.cancel()
        await asyncio.gather(*self._polls.values(), return_exceptions=True)
        self._polls.clear()

    # -- polling -------------------------------------------------------------------------------

    def _poll(self, uuid: str) -> None:
        if uuid in self._polls:
            return
        task = asyncio.get_running_loop().create_task(self._watch(uuid), name=f"first-boot-{uuid[:8]}")
        self._polls[uuid] = task
        task.add_done_callback(lambda t: self._polls.pop(uuid, None) if self._polls.get(uuid) is t else None)

    async def _watch(self, uuid: str) -> None:
        mark = await self.hv.call(lambda c: read_mark(c.lookupByUUIDString(uuid)), timeout=15)
        os_kind = mark.os if mark else "linux"
        path = WINDOWS_REPORT if os_kind == "windows" else LINUX_REPORT
        while self._pending(uuid):
            if await self.inventory.state(uuid) not in (st.RUNNING, st.PAUSED):
                return  # the next boot's guest agent connection polls again
            try:
                text = await self.hv.call(lambda c: read_guest_file(c.lookupByUUIDString(uuid), path),
                                          timeout=READ_DEADLINE_S * 3 + 5, what="first-boot report", pool=self.pool)
            except asyncio.CancelledError:
                raise
            except (libvirt.libvirtError, AgentError) as exc:  # a guest agent gone away or hung: again later
                log.debug("event=vm.customization_poll vm=%s error=%r", uuid, getattr(exc, "message", exc))
                text = None
            if text is not None:
                state, message = parse_report(os_kind, text)
                if state != PENDING:
                    await self._finish(uuid, mark, state, message)
                    return
            await asyncio.sleep(self.poll_interval_s)

    async def _finish(self, uuid: str, mark: CustomizationMark | None, state: str, message: str) -> None:
        since = mark.since if mark else 0.0
        done = CustomizationMark(state, mark.os if mark else "linux", since, time.time(), message)

        def apply(conn: libvirt.virConnect) -> str:
            dom = conn.lookupByUUIDString(uuid)
            detach_seed(dom)
            write_metadata(dom, CUSTOMIZATION_NS, CUSTOMIZATION_KEY, done.to_xml())
            return dom.name()

        name = await self.hv.call(apply, timeout=30)
        seed_drive.remove_seed(self.state_dir, uuid)
        self.inventory.forget(uuid)
        took = f" in {done.finished - since:.0f} s" if since else ""
        await self.events.publish(f"vm.customization.{state}", resource_kind="vm", resource_id=uuid, resource_name=name,
                                  message=f"{name}: first-boot customization {state}{took}: {message}",
                                  attributes={"state": state})
        log.info("event=vm.customization_%s vm=%s message=%r", state, uuid, message)
