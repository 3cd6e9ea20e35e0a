"""SAN test helpers: recorded SCSI hosts (tests/fixtures/scsi, made by
tools/make-scsi-fixtures.py): working copies of their sysfs/devfs trees, the datastores that
point at them, and a clock tests advance; and a real tgtd target for tests that need an array.

Why here: the kernel of the test machines has no SCSI layer, so every test of kernel iSCSI,
FC and multipath (the SAN code on its own, and the LUN release driven by the compute service)
runs the real code on these trees, and the RecordingRunner's effects move them from one
recorded stage to the next as the kernel would.
"""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cna_agent.storage.model import DatastoreDecl, validate_datastore

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "scsi"
IQN = "iqn.2006-08.com.huawei:oceanstor:2100a8f0000000000::20003:192.0.2.20"
ISCSI_WWN = "6a8ffba1005d5a0a0000000000000001"
FC_WWN = "6a8ffba1005d5a0a00000000000000f3"


class Tree:
    """A working copy of one recorded stage that later stages can be laid over."""

    def __init__(self, root: Path, scenario: str, stage: str) -> None:
        self.root, self.scenario = root, scenario
        shutil.copytree(FIX / scenario / stage, root, symlinks=True)

    def overlay(self, stage: str):
        src = FIX / self.scenario / stage

        def apply() -> None:
            for dirpath, dirnames, filenames in os.walk(src):
                rel = Path(dirpath).relative_to(src)
                for name in dirnames + filenames:
                    s_, d_ = Path(dirpath) / name, self.root / rel / name
                    if s_.is_symlink():
                        if d_.is_symlink() or d_.is_file():
                            d_.unlink()
                        if not d_.exists():
                            d_.parent.mkdir(parents=True, exist_ok=True)
                            os.symlink(os.readlink(s_), d_)
                    elif s_.is_dir():
                        d_.mkdir(parents=True, exist_ok=True)
                    else:
                        d_.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(s_, d_)
        return apply

    def remove_disk_on_delete(self, path: str, data: str) -> None:
        """What the kernel does on "1" > /sys/block/sdX/device/delete: the disk and its links go."""
        if not path.endswith("/device/delete"):
            return
        disk = Path(path).parts[-3]
        shutil.rmtree(self.root / "sys/block" / disk)
        (self.root / "dev" / disk).unlink()
        for link in (self.root / "dev/disk/by-id").iterdir():
            if link.is_symlink() and os.readlink(link).endswith("/" + disk):
                link.unlink()

    def remove_map(self, dm: str, name: str):
        def effect() -> None:
            shutil.rmtree(self.root / "sys/block" / dm)
            for p in (self.root / "dev/mapper" / name, self.root / "dev" / dm):
                p.unlink()
            for link in (self.root / "dev/disk/by-id").iterdir():
                if os.readlink(link).endswith("/" + dm):
                    link.unlink()
        return effect


class FakeClock:
    """A monotonic clock that moves only when sleep() is called (scan and release deadlines)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def iscsi_decl(**kw) -> DatastoreDecl:
    """Datastore san1: the recorded iSCSI target through the kernel initiator, two portals."""
    d = DatastoreDecl(name="san1", type="iscsi", portals=("192.0.2.20", "192.0.2.21:3260"), target_iqn=IQN,
                      initiator="kernel", scan_timeout_s=5.0, **kw)
    return validate_datastore(d, "storage.datastores.san1")


def fc_decl(**kw) -> DatastoreDecl:
    """Datastore fc1: the recorded FC target ports and the one LUN they serve."""
    d = DatastoreDecl(name="fc1", type="fc", target_wwpns=("2100a8f000000001", "22:00:a8:f0:00:00:00:01"),
                      lun_wwns=(FC_WWN,), scan_timeout_s=3.0, **kw)
    return validate_datastore(d, "storage.datastores.fc1")


# -- a real tgtd target (tools/testbed.py), for tests outside the integration tier -------------

@contextmanager
def tgtd_target(run_dir: Path, iqn: str, luns: list[Path], *, chap: tuple[str, str] | None = None) -> Iterator[object]:
    """tgtd serving ``luns`` (LUN 1..n) as target ``iqn`` on 127.0.0.1:3260, optionally only to
    the CHAP account ``chap`` = (user, secret); yields the Testbed.

    Why here: the integration tier's session ``testbed`` fixture also brings up libvirtd and OVS;
    e2e tests that only need an iSCSI array take tgtd alone. A tgtd already answering on the
    testbed's control port is reused and left running; one started here is stopped again.
    """
    from support.tools import load_tool

    mod = sys.modules.get("cna_testbed") or load_tool("cna_testbed", "testbed.py")
    tb = mod.Testbed(run_dir)
    tb.up(["tgtd"])
    try:
        tb.iscsi_create_target(iqn, luns, chap=chap)
        yield tb
    finally:
        try:
            tb.iscsi_delete_target(iqn)
        finally:
            tb.down()
