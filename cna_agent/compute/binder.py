"""Turns a VM spec's abstract references into what libvirt must be told: disk sources
(storage), NIC ports (network), boot files, a CPU/memory placement (placement), and MACs.

Compute meets the other subsystems only here and through the provider Protocols of
contracts.py, handed in by the wiring; nothing is looked up by name. Where an agent runs
without a subsystem the wiring passes compute/resolvers.py's stand-ins, which refuse clearly.
"""

from __future__ import annotations

import logging

import random
from typing import Iterable

from cna_agent.compute.inventory import VmInventory
from cna_agent.compute.render import Bindings
from cna_agent.compute.resolvers import LocalFileResolver
from cna_agent.compute.spec import NicSpec, VmSpec
from cna_agent.compute.spec_validation import check_mac
from cna_agent.contracts import DiskProvider, DiskSourceBinding, NicBinding, Placer, PortProvider
from cna_agent.errors import AlreadyExists, ResourceBusy

MAC_PREFIX = "52:54:00"


def generate_mac(taken: Iterable[str], rng: random.Random | None = None) -> str:
    """A 52:54:00:xx:xx:xx MAC not in ``taken`` (every MAC of every domain on this host plus
    those already handed out in this request); 2^24 candidates, checked anyway."""
    used = {m.lower() for m in taken}
    rng = rng or random.SystemRandom()
    for _ in range(1000):
        tail = rng.getrandbits(24)
        mac = f"{MAC_PREFIX}:{tail >> 16 & 0xff:02x}:{tail >> 8 & 0xff:02x}:{tail & 0xff:02x}"
        if mac not in used:
            return mac
    raise ResourceBusy("could not find a free MAC address in 52:54:00:00:00:00/24 after 1000 tries")


log = logging.getLogger(__name__)

class Binder:
    def __init__(self, inventory: VmInventory, local_files: LocalFileResolver, disks: DiskProvider | None,
                 ports: PortProvider, placer: Placer | None) -> None:
        self.inventory = inventory
        self.local_files = local_files
        #: None: no storage subsystem; only absolute paths under [compute] image_dirs work.
        self.disks = disks
        self.ports = ports
        self.placer = placer

    @property
    def volumes(self) -> DiskProvider:
        """Where datastore volumes and LUNs are resolved (the local-file stand-in without storage)."""
        return self.disks if self.disks is not None else self.local_files  # type: ignore[return-value]

    async def disk(self, spec: VmSpec, i: int, *, field: str) -> DiskSourceBinding:
        disk = spec.disks[i]
        if disk.volume:
            # Absolute paths are local images under [compute] image_dirs; datastore ids
            # ("datastore/relative/path") belong to the storage subsystem.
            r = self.local_files if disk.volume.startswith("/") else self.volumes
            return await r.resolve_volume(disk.volume, field=f"{field}.volume")
        assert disk.lun is not None
        return await self.volumes.resolve_lun(disk.lun.datastore, disk.lun.lun_id, field=f"{field}.lun", vm=spec.uuid)

    async def nic(self, nic: NicSpec, *, field: str) -> NicBinding:
        return await self.ports.resolve_port_group(nic.port_group, field=f"{field}.port_group")

    async def release_luns(self, spec: VmSpec, indexes: Iterable[int]) -> None:
        """A define or hot-plug that bound these LUN disks failed: drop the VM's claims."""
        for i in indexes:
            lun = spec.disks[i].lun
            if lun is not None:
                try:
                    await self.volumes.release_lun(lun.datastore, lun.lun_id, field=f"spec.disks[{i}].lun", vm=spec.uuid)
                except Exception:  # the failure that brought us here is what the caller reports
                    pass

    async def bindings(self, spec: VmSpec) -> Bindings:
        """Every binding of a spec. When one fails, the LUN claims made so far are dropped
        again (placement is released by the caller, which knows whether it reserved it)."""
        disks: list[DiskSourceBinding] = []
        try:
            for i in range(len(spec.disks)):
                disks.append(await self.disk(spec, i, field=f"spec.disks[{i}]"))
            nics = [await self.nic(n, field=f"spec.nics[{i}]") for i, n in enumerate(spec.nics)]
            kernel = self.boot_file(spec.boot.kernel, "spec.boot.kernel") if spec.boot.kernel else ""
            initrd = self.boot_file(spec.boot.initrd, "spec.boot.initrd") if spec.boot.initrd else ""
            placement = None
            if self.placer is not None and (spec.dedicated_cpus or spec.hugepages):
                # Reserved now, under the placer's lock and in the state database, so concurrent
                # creations never share a dedicated CPU; released again if the create fails.
                placement = await self.placer.plan(spec.uuid, spec.effective_max_vcpus, spec.memory_mib,
                                                   dedicated=spec.dedicated_cpus, hugepages=spec.hugepages,
                                                   numa_cells=spec.numa_cells)
        except BaseException:
            await self.release_luns(spec, range(len(disks)))
            raise
        return Bindings(disks=disks, nics=nics, kernel=kernel, initrd=initrd, placement=placement)

    def boot_file(self, path: str, field: str) -> str:
        if self.disks is not None and not path.startswith("/"):
            return self.disks.resolve_boot_file(path, field=field)
        return self.local_files.confine(path, field=field)

    async def fill_macs(self, nics: Iterable[NicSpec], *, unique_field: str = "") -> None:
        """Lower-case the given MACs and give every NIC without one a MAC free on this host.

        With ``unique_field`` (a hot-plug), a given MAC must be unused anywhere on this host:
        it is checked and refused as ALREADY_EXISTS naming that field."""
        nics = list(nics)
        for nic in nics:
            if nic.mac and not unique_field:
                nic.mac = nic.mac.lower()
        if not unique_field and all(nic.mac for nic in nics):
            return  # nothing to generate or check: the host's MACs are not read
        taken = await self.inventory.all_macs()
        for nic in nics:
            if nic.mac and unique_field:
                nic.mac = check_mac(nic.mac, unique_field)
                if nic.mac in taken:
                    raise AlreadyExists(f"{unique_field}: {nic.mac} is already used by a NIC on this host", field=unique_field)
            elif nic.mac:
                nic.mac = nic.mac.lower()
            else:
                nic.mac = generate_mac(taken)
            taken.add(nic.mac)

    async def release_placement(self, uuid: str) -> None:
        if self.placer is not None:
            await self.placer.release(uuid)

    async def release_lun_disks(self, spec: VmSpec, indexes: list[int]) -> None:
        """Hand each SAN LUN disk that just left VM ``spec.uuid`` back to storage for its host cleanup.

        Called once the VM change (undefine, detach) is done in libvirt, so it never raises: a
        hung or failing SAN must not turn a finished deletion into an error. Storage reports such
        releases itself (``lun.release_failed``) and retries them; here they are only logged.
        """
        seen: set[tuple[str, str]] = set()
        for i in indexes:
            lun = spec.disks[i].lun
            if lun is None or (lun.datastore, lun.lun_id) in seen:
                continue
            seen.add((lun.datastore, lun.lun_id))
            try:
                outcome = await self.volumes.release_lun(lun.datastore, lun.lun_id, field=f"spec.disks[{i}].lun", vm=spec.uuid)
            except Exception as exc:  # the VM change stands whatever storage says
                log.warning("event=vm.lun_release_error vm=%s datastore=%s lun=%s error=%r", spec.uuid, lun.datastore,
                            lun.lun_id, getattr(exc, "message", None) or str(exc))
                continue
            log.info("event=vm.lun_release vm=%s datastore=%s lun=%s outcome=%s", spec.uuid, lun.datastore, lun.lun_id, outcome)
