"""libvirt secret XML (storage/secretxml.py) and the CHAP secret the agent defines with it.

Round trips: the document the agent sends, and hand-written documents shaped like
``virsh secret-dumpxml`` for each usage type of libvirt's secret.rng
(tests/fixtures/secretxml). Every document, given and rebuilt, is checked with
``virt-xml-validate FILE secret``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import libvirt
import pytest

from cna_agent.storage.secrets import LibvirtSecrets
from cna_agent.storage.secretxml import Secret, iscsi_secret
from support.xml import canon, schema_check
from support.libvirt import ConnHypervisor

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "secretxml"


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.glob("*.xml")))
def test_libvirt_shaped_secrets_round_trip_and_validate(fixture: str, tmp_path: Path) -> None:
    given = (FIXTURES / fixture).read_text()
    schema_check(tmp_path, given, "secret", "given")
    built = Secret.from_xml(given).to_xml()
    assert canon(built) == canon(given)
    assert Secret.from_xml(built).to_xml() == built
    schema_check(tmp_path, built, "secret", "built")


def test_fields_of_a_dumped_chap_secret() -> None:
    sec = Secret.from_xml((FIXTURES / "iscsi-chap.xml").read_text())
    assert (sec.ephemeral, sec.private, sec.usage_type, sec.usage_target) == (False, True, "iscsi", "cna-datastore-san1")
    assert sec.uuid == "0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f" and sec.usage_name is None


def test_agent_chap_secret_is_the_document_it_always_sent(tmp_path: Path) -> None:
    xml = iscsi_secret("cna-datastore-san1", "cna-agent CHAP secret").to_xml(pretty=False)
    assert xml == ('<secret ephemeral="no" private="yes"><description>cna-agent CHAP secret</description>'
                   '<usage type="iscsi"><target>cna-datastore-san1</target></usage></secret>')
    old = ("<secret ephemeral='no' private='yes'><description>cna-agent CHAP secret</description>"
           "<usage type='iscsi'><target>cna-datastore-san1</target></usage></secret>")
    assert canon(xml) == canon(old)
    schema_check(tmp_path, xml, "secret")


def test_values_are_escaped_by_construction(tmp_path: Path) -> None:
    usage = "cna-datastore-a&b<c>'d\"e"
    sec = iscsi_secret(usage, "</description><usage type='volume'>")
    xml = sec.to_xml()
    back = Secret.from_xml(xml)
    assert (back.usage_target, back.description, back.usage_type) == (usage, "</description><usage type='volume'>", "iscsi")
    assert back == sec
    schema_check(tmp_path, xml, "secret")


class _Conn:
    def __init__(self) -> None:
        self.defined: list[str] = []
        self.values: list[bytes] = []

    def secretLookupByUsage(self, usage_type: int, usage: str):
        raise libvirt.libvirtError(f"no secret with usage {usage}")

    def secretDefineXML(self, xml: str, flags: int):
        self.defined.append(xml)
        conn = self

        class _Sec:
            def setValue(self, value: bytes, flags: int) -> None:
                conn.values.append(value)

            def UUIDString(self) -> str:
                return "0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f"

        return _Sec()


def test_ensure_defines_the_typed_document(tmp_path: Path) -> None:
    conn = _Conn()
    got = asyncio.run(LibvirtSecrets(ConnHypervisor(conn)).ensure("cna-datastore-san1", b"s3cret"))  # type: ignore[arg-type]
    assert got == "0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f" and conn.values == [b"s3cret"]
    assert conn.defined == [iscsi_secret("cna-datastore-san1", "cna-agent CHAP secret").to_xml(pretty=False)]
    schema_check(tmp_path, conn.defined[0], "secret")
