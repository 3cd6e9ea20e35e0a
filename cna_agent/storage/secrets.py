"""CHAP passwords for QEMU's iSCSI initiator, held by libvirt as private secrets.

Why libvirt secrets: the domain XML then names only a secret UUID (``<auth username=...>
<secret type='iscsi' uuid=.../>``), so the password is never in the XML, the agent's metadata,
logs or QEMU's command line (libvirt hands it to QEMU as an encrypted secret object). Secrets
are keyed by usage "cna-datastore-NAME"; an existing one is reused and its value refreshed.
"""

from __future__ import annotations

from cna_agent.hypervisor import Hypervisor
from cna_agent.storage.secretxml import iscsi_secret


class LibvirtSecrets:
    def __init__(self, hypervisor: Hypervisor) -> None:
        self.hv = hypervisor

    async def ensure(self, usage: str, value: bytes) -> str:
        import libvirt

        def do(conn: "libvirt.virConnect") -> str:
            try:
                sec = conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_ISCSI, usage)
            except libvirt.libvirtError:
                sec = conn.secretDefineXML(iscsi_secret(usage, "cna-agent CHAP secret").to_xml(pretty=False), 0)
            sec.setValue(value, 0)
            return sec.UUIDString()

        return await self.hv.call(do, timeout=30)
