"""One reconcile per VM (KubeVirt's virt-handler ``sync``): every check that compares a VM's
desired state with the actual one runs through here, for one VM at a time.

The checks come from the subsystems that own what they check (contracts.VmCheck): network's
port check (the VM's NICs on their bridges, VLANs and labels), placement's pinning check (the
VM's threads and memory where its plan put them), compute's I/O-error resume (a VM paused by a
storage error whose storage answers again). They are run

* at start-up, over every VM (after adoption),
* on the VM's events (libvirt lifecycle events, I/O errors): that VM, every check, soon,
* on a timer: each check over every VM at its own interval.

No step depends on having seen an earlier event: each check reads the VM's state afresh. A
check that fails is logged and retried at its next turn; it never stops the others.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Sequence

from cna_agent.compute.inventory import VmInfo, VmInventory
from cna_agent.contracts import Finding, VmCheck, VmStatus
from cna_agent.errors import NotFound
from cna_agent.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class VmReconciler:
    def __init__(self, inventory: VmInventory, checks: Sequence[VmCheck], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inventory = inventory
        self.checks = list(checks)
        self._clock = clock
        self._queued: dict[str, None] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def enqueue(self, vm_uuid: str) -> None:
        """Reconcile this VM soon (an event about it arrived). Called on the event loop."""
        self._queued[vm_uuid] = None
        self._wake.set()

    async def reconcile(self, vm_uuid: str, checks: Sequence[VmCheck] | None = None) -> list[Finding]:
        """Run the checks (all by default) for one VM, with its state read now."""
        try:
            info = await self.inventory.status(vm_uuid)
        except NotFound:
            return []  # gone meanwhile (an event about a deleted VM)
        if not info.managed:
            return []  # not ours: left alone
        return await self._run(info, checks)

    async def _run(self, info: VmInfo, checks: Sequence[VmCheck] | None) -> list[Finding]:
        vm = VmStatus(info.uuid, info.name, info.state, info.reason)
        vm_uuid = vm.uuid
        found: list[Finding] = []
        for check in self.checks if checks is None else checks:
            try:
                found.extend(await check.check_vm(vm))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one failing check must not stop the others
                log.warning("event=reconcile.check_failed check=%s vm=%s error=%r", check.name, vm_uuid,
                            getattr(exc, "message", None) or str(exc))
        return found

    async def reconcile_all(self, checks: Sequence[VmCheck] | None = None) -> list[Finding]:
        """Every managed VM, one after the other (a host with hundreds of VMs is never checked
        all at once)."""
        if not self.inventory.hv.connected:
            return []
        found: list[Finding] = []
        for info in await self.inventory.list(status_only=True):
            found.extend(await self._run(info, checks))
        return found

    async def start(self) -> None:
        if self._task is None and self.checks:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="vm-reconcile")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _loop(self) -> None:
        now = self._clock()
        due = {c.name: now + c.interval_s for c in self.checks if c.interval_s > 0}
        first = True
        while True:
            try:
                if first:
                    first = False
                    await self.reconcile_all()  # start-up
                while self._queued:
                    uuid = next(iter(self._queued))
                    del self._queued[uuid]
                    await self.reconcile(uuid)
                now = self._clock()
                ready = [c for c in self.checks if c.name in due and due[c.name] <= now]
                for c in ready:
                    due[c.name] = now + c.interval_s  # before the pass: a failing pass waits its turn too
                if ready:
                    await self.reconcile_all(ready)
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must outlive any single failure (libvirt gone, ...)
                log.exception("event=reconcile.pass_failed")
            if self._queued:
                continue
            wait = min(due.values()) - self._clock() if due else None
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(wait, 0.05) if wait is not None else None)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
