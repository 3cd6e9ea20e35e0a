"""CHAP passwords for QEMU's iSCSI initiator, held by libvirt as private secrets.

Why libvirt secrets: the domain XML then names only a secret UUID (``<auth username=...>
<secret type='iscsi' uuid=.../>``), so the password is never in the XML, the agent's metadata,
logs or QEMU's command line (libvirt hands it to QEMU as an AES-encrypted secret object, keyed
by the domain's master key). Secrets are keyed by usage "cna-datastore-NAME"; an existing one
is reused and its value refreshed, so a changed chap_secret_file takes effect at the next bind.

Only a libvirt daemon (``qemu:///system``) can do this. libvirt's embedded QEMU driver (9.0,
seen on the testbed) cannot hand any secret to QEMU: its connection has no secret API ("not
supported by the connection driver: virSecretDefineXML"); a ``secret:///embed`` connection on
the same root defines them, but the QEMU driver finds that connection only on the thread that
opened it first (libvirt keeps it thread-local) and then still fails reading the value ("No
current identity to elevate": nothing sets a caller identity in an embedded process). So an
embedded agent refuses CHAP for QEMU's initiator before anything is defined, saying why and
what works instead (:class:`SecretsUnsupported`).
"""

from __future__ import annotations

from cna_agent.errors import FailedPrecondition
from cna_agent.hypervisor import Hypervisor
from cna_agent.storage.secretxml import iscsi_secret


class SecretsUnsupported(FailedPrecondition):
    """This hypervisor connection cannot give QEMU a secret."""


class LibvirtSecrets:
    def __init__(self, hypervisor: Hypervisor) -> None:
        self.hv = hypervisor

    def check(self) -> None:
        """Raise SecretsUnsupported when secrets defined here could never reach QEMU."""
        if self.hv.uri.startswith("qemu:///embed"):
            raise SecretsUnsupported(
                "libvirt's embedded QEMU driver cannot pass a CHAP secret to QEMU; run the agent on a "
                "libvirt daemon ([libvirt] uri = \"qemu:///system\") or log in from the host (initiator = \"kernel\")")

    async def ensure(self, usage: str, value: bytes) -> str:
        import libvirt

        self.check()

        def do(conn: "libvirt.virConnect") -> str:
            try:
                sec = conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_ISCSI, usage)
            except libvirt.libvirtError:
                sec = conn.secretDefineXML(iscsi_secret(usage, "cna-agent CHAP secret").to_xml(pretty=False), 0)
            sec.setValue(value, 0)
            return sec.UUIDString()

        return await self.hv.call(do, timeout=30)
