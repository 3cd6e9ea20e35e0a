"""The template mark in a VM's persistent definition (ConvertVmToTemplate writes it): the VM is
a template since then, is not started or changed, and DeployVm makes VMs from it. In the
definition (marks.py) so an agent restarted without its database still knows; GetVm and ListVms
report it as status.template."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt

from cna_agent.compute.marks import read_config_metadata, write_metadata

TEMPLATE_NS = "https://cna-agent.org/xmlns/template/1.0"
TEMPLATE_KEY = "tmpl"


@dataclass(frozen=True)
class TemplateMark:
    since: float

    def to_xml(self) -> str:
        el = ET.Element("template")  # libvirt adds the namespace and its prefix (marks.py)
        el.set("since", f"{self.since:.3f}")
        return ET.tostring(el, encoding="unicode")

    @classmethod
    def from_xml(cls, text: str) -> "TemplateMark | None":
        try:
            return cls(float(ET.fromstring(text).get("since", "0")))
        except (ET.ParseError, ValueError):
            return None


def read_mark(dom: libvirt.virDomain) -> TemplateMark | None:
    text = read_config_metadata(dom, TEMPLATE_NS)
    return TemplateMark.from_xml(text) if text is not None else None


def write_mark(dom: libvirt.virDomain, mark: TemplateMark) -> None:
    write_metadata(dom, TEMPLATE_NS, TEMPLATE_KEY, mark.to_xml())


def clear_mark(dom: libvirt.virDomain) -> None:
    write_metadata(dom, TEMPLATE_NS, TEMPLATE_KEY, None)


def template_message(name: str) -> str:
    return (f"vm {name!r} is a template: it is not started or changed; DeployVm makes VMs from it "
            "(DeleteVm removes it)")
