"""The backup and checkpoint documents compute/backup.py hands libvirt, and what it reads back
from backupGetXMLDesc: checked against libvirt's own RNG schemas where virt-xml-validate has
them, and the parse against the document libvirt 9.0 returns for a running pull backup."""

from __future__ import annotations

import shutil
import subprocess
from xml.etree import ElementTree as ET

import pytest

from cna_agent.compute import backup as b


def _validate(tmp_path, xml: str, schema: str) -> None:
    if shutil.which("virt-xml-validate") is None:
        pytest.skip("virt-xml-validate is not installed")
    path = tmp_path / f"{schema}.xml"
    path.write_text(xml)
    p = subprocess.run(["virt-xml-validate", str(path), schema], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr + xml


def test_a_pull_backup_document_names_every_disk_and_validates(tmp_path) -> None:
    xml = b.backup_xml("/run/cna/qmp/u.nbd", ["vda", "vdb"], ["vdc"], "/var/lib/cna/backup/u", "cna-20261203T140000-ab12")
    root = ET.fromstring(xml)
    assert root.get("mode") == "pull" and root.findtext("incremental") == "cna-20261203T140000-ab12"
    assert root.find("server").attrib == {"transport": "unix", "socket": "/run/cna/qmp/u.nbd"}
    disks = {d.get("name"): d for d in root.findall("disks/disk")}
    assert disks["vda"].get("backup") == "yes" and disks["vda"].find("scratch").get("file") == "/var/lib/cna/backup/u/scratch-vda.qcow2"
    assert disks["vdc"].get("backup") == "no"
    _validate(tmp_path, xml, "domainbackup")
    full = ET.fromstring(b.backup_xml("/s", ["vda"], [], "/d", ""))
    assert full.find("incremental") is None


def test_a_checkpoint_document_keeps_bitmaps_only_for_backed_up_disks(tmp_path) -> None:
    xml = b.checkpoint_xml("cna-x", ["vda"], ["vdb"])
    root = ET.fromstring(xml)
    assert root.findtext("name") == "cna-x"
    assert [(d.get("name"), d.get("checkpoint")) for d in root.findall("disks/disk")] == [("vda", "bitmap"), ("vdb", "no")]
    _validate(tmp_path, xml, "domaincheckpoint")


def test_the_running_backup_is_read_from_libvirts_document() -> None:
    xml = """<domainbackup mode='pull'>
      <incremental>cna-a</incremental>
      <server transport='unix' socket='/run/q/u.nbd'/>
      <disks>
        <disk name='vda' backup='yes' type='file' backupmode='incremental' incremental='cna-a' exportname='vda'
              exportbitmap='backup-vda'><driver type='qcow2'/><scratch file='/s/scratch-vda.qcow2'/></disk>
        <disk name='vdb' backup='no'/>
      </disks>
    </domainbackup>"""
    info = b.parse_backup("u", xml, {"vda": 1 << 30}, "cna-b", 5.0)
    assert info.incremental_from == "cna-a" and info.checkpoint == "cna-b" and info.socket == "/run/q/u.nbd"
    (disk,) = info.disks
    assert disk == b.BackupDisk("vda", "vda", "nbd+unix:///vda?socket=/run/q/u.nbd", "backup-vda", 1 << 30)


def test_checkpoint_names_carry_their_time() -> None:
    name = b.new_checkpoint_name(1_764_763_200.0)
    assert b.CHECKPOINT_RE.match(name) and name.startswith("cna-20251203T120000-")
    assert b.checkpoint_time(name) == 1_764_763_200.0
