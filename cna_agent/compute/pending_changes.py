"""Changes UpdateVm accepted for a running VM that wait for its next start.

Why this shape: libvirt already keeps two definitions of a running domain, the live one (what
QEMU runs) and the persistent one (what the next start runs), so a change that cannot be made
live is written to the persistent definition and libvirt applies it on the next start. What
libvirt does not say is *which* of the spec's fields differ; recomputing that from both XML
documents would need a reverse mapping for every field. So UpdateVm records the fields in a mark
in the persistent definition (marks.py), with the identity of the QEMU process that was running
(its pid and start time from /proc): the mark holds only while that process runs. Any later
start (StartVm, libvirt's autostart, a start by another client) is a new process, so the mark
goes stale by itself and no start path has to remember to clear it; a guest reboot keeps the
process, and the changes rightly stay pending.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt

from cna_agent.compute.marks import read_config_metadata, write_metadata
from cna_agent.errors import FailedPrecondition

PENDING_NS = "https://cna-agent.org/xmlns/pending/1.0"
PENDING_KEY = "pend"


@dataclass(frozen=True)
class PendingMark:
    fields: tuple[str, ...]
    #: "<pid>:<start time in clock ticks>" of the QEMU process the changes did not reach.
    qemu: str
    since: float

    def to_xml(self) -> str:
        el = ET.Element("pending")  # libvirt adds the namespace and its prefix (marks.py)
        el.set("fields", ",".join(self.fields))
        el.set("qemu", self.qemu)
        el.set("since", f"{self.since:.3f}")
        return ET.tostring(el, encoding="unicode")

    @classmethod
    def from_xml(cls, text: str) -> "PendingMark | None":
        try:
            el = ET.fromstring(text)
            fields = tuple(f for f in el.get("fields", "").split(",") if f)
            return cls(fields, el.get("qemu", ""), float(el.get("since", "0"))) if fields else None
        except (ET.ParseError, ValueError):
            return None


def qemu_identity(pid: str) -> str:
    """``pid:starttime`` of a running process (field 22 of /proc/<pid>/stat), "" when the pid is
    unknown or gone. A pid alone could be reused by a later QEMU; the pair cannot."""
    if not pid.isdigit():
        return ""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return ""
    rest = stat.rpartition(")")[2].split()  # the command name may hold spaces and parentheses
    return f"{pid}:{rest[19]}" if len(rest) > 19 else ""


def read_mark(dom: libvirt.virDomain) -> PendingMark | None:
    text = read_config_metadata(dom, PENDING_NS)
    return PendingMark.from_xml(text) if text is not None else None


def write_mark(dom: libvirt.virDomain, fields: list[str], qemu: str) -> None:
    """Record ``fields`` as pending for the running process ``qemu`` (libvirt pool)."""
    write_metadata(dom, PENDING_NS, PENDING_KEY, PendingMark(tuple(fields), qemu, time.time()).to_xml())


def pending_fields(mark: PendingMark | None, qemu: str) -> tuple[str, ...]:
    """The fields still waiting: the mark's, while the process it was written for still runs."""
    return mark.fields if mark is not None and qemu and mark.qemu == qemu else ()


def refuse_while_pending(fields: tuple[str, ...], name: str, verb: str) -> None:
    """What must not carry a running VM elsewhere while its definition differs from what runs:
    the move takes the live definition, and the pending changes would be lost silently."""
    if fields:
        raise FailedPrecondition(f"vm {name!r} has changes waiting for its next start ({', '.join(fields)}); "
                                 f"restart it (ShutdownVm, StartVm) before you {verb} it", field="vm")
