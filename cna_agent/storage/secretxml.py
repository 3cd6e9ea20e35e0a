"""libvirt secret XML (``<secret>``) as a typed object, on the field tables of cna_agent/xmlobj.py.

Names follow libvirt's secret.rng: ``ephemeral``/``private`` (yes/no), the UUID libvirt
assigns, a description, and one ``<usage>`` whose ``type`` says which child names it
(volume: a volume path; ceph, tls, vtpm: a name; iscsi: a target). Values are escaped by
ElementTree when built, never pasted into markup.
"""

from __future__ import annotations

from cna_agent.xmlobj import Prop, XmlObject


class Secret(XmlObject):
    TAG = "secret"
    ephemeral = Prop("@ephemeral", "yesno")
    private = Prop("@private", "yesno")
    uuid = Prop("uuid")
    description = Prop("description")
    usage_type = Prop("usage/@type")
    usage_volume = Prop("usage/volume")
    usage_name = Prop("usage/name")
    usage_target = Prop("usage/target")


def iscsi_secret(usage: str, description: str) -> Secret:
    """A persistent, private secret for an iSCSI CHAP password, keyed by ``usage``."""
    return Secret(ephemeral=False, private=True, description=description, usage_type="iscsi", usage_target=usage)
