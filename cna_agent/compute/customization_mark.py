"""The customization mark in a VM's persistent definition (first_boot.py writes it): whether
its first-boot customization is pending, done or failed, and since when. In the definition
(marks.py) so it holds for an agent restarted without its database; GetVm reports it."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt

from cna_agent.compute.marks import read_config_metadata
from cna_agent.errors import FailedPrecondition

CUSTOMIZATION_NS = "https://cna-agent.org/xmlns/customization/1.0"
CUSTOMIZATION_KEY = "cust"
PENDING, DONE, FAILED = "pending", "done", "failed"


@dataclass(frozen=True)
class CustomizationMark:
    state: str
    os: str  # "linux" or "windows": which report to read
    since: float
    finished: float = 0.0
    message: str = ""

    def to_element(self) -> ET.Element:
        el = ET.Element(f"{{{CUSTOMIZATION_NS}}}customization")
        el.set("state", self.state)
        el.set("os", self.os)
        el.set("since", f"{self.since:.3f}")
        if self.finished:
            el.set("finished", f"{self.finished:.3f}")
        if self.message:
            el.set("message", self.message)
        return el

    def to_xml(self) -> str:
        el = self.to_element()
        el.tag = "customization"  # libvirt adds the namespace and its prefix (marks.py)
        return ET.tostring(el, encoding="unicode")

    @classmethod
    def from_xml(cls, text: str) -> "CustomizationMark | None":
        try:
            el = ET.fromstring(text)
            mark = cls(el.get("state", ""), el.get("os", "linux"), float(el.get("since", "0")),
                       float(el.get("finished", "0")), el.get("message", ""))
        except (ET.ParseError, ValueError):
            return None
        return mark if mark.state in (PENDING, DONE, FAILED) else None


def read_mark(dom: libvirt.virDomain) -> CustomizationMark | None:
    text = read_config_metadata(dom, CUSTOMIZATION_NS)
    return CustomizationMark.from_xml(text) if text is not None else None


def refuse_while_pending(mark: CustomizationMark | None, name: str, verb: str) -> None:
    """What must not move a VM whose first boot is not done: its drive is a file of this host's
    state directory (first_boot.py), which the other host would not have."""
    if mark is not None and mark.state == PENDING:
        raise FailedPrecondition(f"vm {name!r} has not finished its first-boot customization (its drive is on this "
                                 f"host); {verb} it once GetVm shows status.customization done", field="vm")
