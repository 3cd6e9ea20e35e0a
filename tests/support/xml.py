"""XML checks shared by the tests of every typed XML model (domains, snapshots, secrets):
libvirt's own schema check and a canonical form for comparing documents."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest


def canon(xml: str) -> str:
    """Quoting, attribute order and indentation aside, the same document."""
    return ET.canonicalize(xml, strip_text=True)


def schema_check(tmp_path: Path, xml: str, schema: str, name: str = "doc") -> None:
    """``virt-xml-validate`` against libvirt's ``schema`` (domain, domainsnapshot, secret...);
    the test is skipped where libvirt-clients is not installed."""
    tool = shutil.which("virt-xml-validate")
    if tool is None:
        pytest.skip("virt-xml-validate (libvirt-clients) is not installed")
    path = tmp_path / f"{name}.xml"
    path.write_text(xml)
    out = subprocess.run([tool, str(path), schema], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{name}: {out.stderr}{out.stdout}\n{xml}"
