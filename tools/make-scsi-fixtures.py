#!/usr/bin/env python3
"""Generate the sysfs/devfs trees the kernel-iSCSI / FC / multipath tests read.

Why generated: this project's build machines have no SCSI layer (no /dev/sdX, no
device-mapper), so the storage code for the kernel initiator, FC HBAs and multipath runs
against trees laid out exactly as Linux 5.x/6.x lays them out on a host attached to a SAN
(an OceanStor-like array: vendor HUAWEI, product XSG1, NAA-6 WWNs). The layout below was
written from a real host's tree: /sys/class/iscsi_session/sessionN/{targetname,device},
session -> .../platform/hostN/sessionN/targetH:C:T/H:C:T:L, /sys/block/sdX/{device,size},
device/{wwid,vendor,model,rescan,delete}, /sys/block/dm-N/{dm/name,dm/uuid,slaves/},
/dev/disk/by-id/{wwn-0x<wwn>,dm-uuid-mpath-3<wwn>}, /sys/class/fc_host/hostN/{port_name,issue_lip},
/sys/class/fc_transport/targetH:C:T/port_name.

Each scenario is written in stages, each stage a complete tree containing everything up to
that point (e.g. before login, logged in, LUN scanned, multipath map built); tests copy one
stage into a temporary root and the recording command runner overlays the next stage when
the command or sysfs write that causes it is issued.

    tools/make-scsi-fixtures.py [--out tests/fixtures/scsi]
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IQN = "iqn.2006-08.com.huawei:oceanstor:2100a8f0000000000::20003:192.0.2.20"
ISCSI_WWN = "6a8ffba1005d5a0a0000000000000001"
FC_WWN = "6a8ffba1005d5a0a00000000000000f3"
HOST_WWPNS = {5: "0x10000090fa000005", 6: "0x10000090fa000006"}
ARRAY_WWPNS = {5: "0x2100a8f000000001", 6: "0x2200a8f000000001"}


def w(root: Path, rel: str, text: str = "") -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def ln(root: Path, rel: str, target: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.is_symlink() or p.exists():
        p.unlink()
    os.symlink(target, p)


def scsi_disk(root: Path, devpath: str, disk: str, wwn: str, lun_sectors: int) -> None:
    """An sdX whose device directory is ``sys/devices/<devpath>`` (ending in H:C:T:L)."""
    dev = f"sys/devices/{devpath}"
    w(root, f"{dev}/wwid", f"naa.{wwn}\n")
    w(root, f"{dev}/vendor", "HUAWEI  \n")
    w(root, f"{dev}/model", "XSG1            \n")
    w(root, f"{dev}/rescan")
    w(root, f"{dev}/delete")
    w(root, f"{dev}/state", "running\n")
    depth = "../" * 2
    ln(root, f"sys/block/{disk}/device", f"{depth}devices/{devpath}")
    w(root, f"sys/block/{disk}/size", f"{lun_sectors}\n")
    (root / f"sys/block/{disk}/holders").mkdir(parents=True, exist_ok=True)
    ln(root, f"dev/disk/by-id/scsi-3{wwn}", f"../../{disk}")
    ln(root, f"dev/disk/by-id/wwn-0x{wwn}", f"../../{disk}")
    w(root, f"dev/{disk}")


def mpath(root: Path, dm: str, name: str, wwn: str, disks: list[str], sectors: int) -> None:
    w(root, f"sys/block/{dm}/dm/name", f"{name}\n")
    w(root, f"sys/block/{dm}/dm/uuid", f"mpath-3{wwn}\n")
    w(root, f"sys/block/{dm}/size", f"{sectors}\n")
    for d in disks:
        ln(root, f"sys/block/{dm}/slaves/{d}", f"../../{d}")
        ln(root, f"sys/block/{d}/holders/{dm}", f"../../{dm}")
    ln(root, f"dev/disk/by-id/dm-uuid-mpath-3{wwn}", f"../../{dm}")
    ln(root, f"dev/disk/by-id/dm-name-{name}", f"../../{dm}")
    ln(root, f"dev/mapper/{name}", f"../{dm}")
    w(root, f"dev/{dm}")


def iscsi(stage: str, root: Path) -> None:
    """Two portals -> two sessions (host3, host4); LUN 1 seen on both; one multipath map."""
    for h in (3, 4):
        w(root, f"sys/class/scsi_host/host{h}/scan")
        w(root, f"sys/class/scsi_host/host{h}/proc_name", "iscsi_tcp\n")
    w(root, "etc/iscsi/initiatorname.iscsi", "InitiatorName=iqn.1993-08.org.debian:01:cnahost\n")
    if stage == "before":
        return
    for n, h in ((1, 3), (2, 4)):
        sess = f"platform/host{h}/session{n}"
        w(root, f"sys/devices/{sess}/iscsi_session/session{n}/targetname", IQN + "\n")
        ln(root, f"sys/class/iscsi_session/session{n}", f"../../devices/{sess}/iscsi_session/session{n}")
        (root / f"sys/devices/{sess}/target{h}:0:0").mkdir(parents=True, exist_ok=True)
        ln(root, f"sys/devices/{sess}/iscsi_session/session{n}/device", "../../../session" + str(n))
    if stage == "logged-in":
        return
    for n, (h, disk) in enumerate(((3, "sdb"), (4, "sdc")), start=1):
        scsi_disk(root, f"platform/host{h}/session{n}/target{h}:0:0/{h}:0:0:1", disk, ISCSI_WWN, 2 * 1024 * 1024 * 20)
    if stage == "scanned":
        return
    mpath(root, "dm-0", "mpatha", ISCSI_WWN, ["sdb", "sdc"], 2 * 1024 * 1024 * 20)
    if stage == "multipath":
        return
    # "grown": the array grew the LUN to 30 GiB and the paths were rescanned
    for disk in ("sdb", "sdc"):
        w(root, f"sys/block/{disk}/size", f"{2 * 1024 * 1024 * 30}\n")
    w(root, "sys/block/dm-0/size", f"{2 * 1024 * 1024 * 30}\n")


def fc(stage: str, root: Path) -> None:
    """Two HBAs (host5, host6) zoned to one array port each; LUN 3 by WWN on both paths."""
    for h in (5, 6):
        pci = f"pci0000:00/0000:00:0{h}.0/host{h}"
        w(root, f"sys/devices/{pci}/fc_host/host{h}/port_name", HOST_WWPNS[h] + "\n")
        w(root, f"sys/devices/{pci}/fc_host/host{h}/issue_lip")
        w(root, f"sys/devices/{pci}/fc_host/host{h}/port_state", "Online\n")
        ln(root, f"sys/class/fc_host/host{h}", f"../../devices/{pci}/fc_host/host{h}")
        w(root, f"sys/class/scsi_host/host{h}/scan")
        w(root, f"sys/devices/{pci}/rport-{h}:0-0/target{h}:0:0/fc_transport/target{h}:0:0/port_name", ARRAY_WWPNS[h] + "\n")
        ln(root, f"sys/class/fc_transport/target{h}:0:0", f"../../devices/{pci}/rport-{h}:0-0/target{h}:0:0/fc_transport/target{h}:0:0")
    if stage == "before":
        return
    for h, disk in ((5, "sdd"), (6, "sde")):
        scsi_disk(root, f"pci0000:00/0000:00:0{h}.0/host{h}/rport-{h}:0-0/target{h}:0:0/{h}:0:0:3", disk, FC_WWN, 2 * 1024 * 1024 * 10)
    if stage == "scanned":
        return
    mpath(root, "dm-1", "mpathb", FC_WWN, ["sdd", "sde"], 2 * 1024 * 1024 * 10)


SCENARIOS = {
    "iscsi": (iscsi, ["before", "logged-in", "scanned", "multipath", "grown"]),
    "fc": (fc, ["before", "scanned", "multipath"]),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "scsi")
    a = ap.parse_args(argv)
    for name, (build, stages) in SCENARIOS.items():
        for stage in stages:
            root = a.out / name / stage
            if root.exists():
                shutil.rmtree(root)
            root.mkdir(parents=True)
            build(stage, root)
    print(f"wrote {', '.join(SCENARIOS)} under {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
