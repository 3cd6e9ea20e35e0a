"""iSCSI LUNs through QEMU's own initiator (libiscsi): no host block device, no kernel SCSI.

The guest's disk is ``<disk type='network'><source protocol='iscsi' name='IQN/LUN'>`` with the
datastore's portals as hosts; QEMU logs in itself. The agent only needs to list the target's
LUNs and their sizes: ``iscsi-ls`` enumerates them (it has no machine-readable mode, so only
its fixed "Lun:N Type:T" lines are read) and ``qemu-img info --output=json iscsi://...`` gives
the exact size. CHAP credentials reach libiscsi through its LIBISCSI_CHAP_USERNAME /
LIBISCSI_CHAP_PASSWORD environment variables, never the command line (``ps`` shows argv);
for guests, libvirt holds the password as a private secret (cna_agent.storage.secrets).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cna_agent.errors import InvalidArgument, NotFound
from cna_agent.storage import qemuimg
from cna_agent.storage.model import DatastoreDecl
from cna_agent.storage.runner import CommandError, CommandRunner

LUN_LINE = re.compile(r"^Lun:(\d+)\s+Type:(\S+)", re.M)
MAX_LUN = 16383


@dataclass(frozen=True)
class LibiscsiLun:
    id: str  # "<iqn>/<lun>"
    lun: int
    size_bytes: int
    type: str = "DIRECT_ACCESS"


def portal_url(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def lun_url(decl: DatastoreDecl, lun: int, portal: int = 0) -> str:
    host, port = decl.portal_hosts()[portal]
    return f"iscsi://{portal_url(host, port)}/{decl.target_iqn}/{lun}"


def chap_env(decl: DatastoreDecl, secret: str) -> dict[str, str]:
    if not decl.chap_user:
        return {}
    return {"LIBISCSI_CHAP_USERNAME": decl.chap_user, "LIBISCSI_CHAP_PASSWORD": secret}


def parse_lun_id(decl: DatastoreDecl, lun_id: str, field: str) -> int:
    """Accept "<lun>" or "<target iqn>/<lun>" (the iqn must be the datastore's)."""
    iqn, sep, num = lun_id.rpartition("/")
    if sep and iqn != decl.target_iqn:
        raise InvalidArgument(field, f"{lun_id!r}: datastore {decl.name!r} serves target {decl.target_iqn}, not {iqn}")
    if not num.isdigit() or int(num) > MAX_LUN:
        raise InvalidArgument(field, f"{lun_id!r} is not a LUN number 0..{MAX_LUN} (or '<iqn>/<lun>')")
    return int(num)


def list_luns(runner: CommandRunner, decl: DatastoreDecl, *, initiator_iqn: str, secret: str, timeout: float) -> list[LibiscsiLun]:
    """Disk LUNs of the datastore's target (controller LUN 0 and non-disk LUNs skipped)."""
    env = chap_env(decl, secret)
    argv = ["iscsi-ls", "-s"]  # -s: list the LUNs of each target
    if initiator_iqn:
        argv += ["-i", initiator_iqn]
    host, port = decl.portal_hosts()[0]
    argv.append(f"iscsi://{portal_url(host, port)}")
    out = runner.run(argv, timeout=timeout, env=env).stdout
    luns: list[LibiscsiLun] = []
    current = ""
    for line in out.splitlines():
        if line.startswith("Target:"):
            current = line.split()[0].removeprefix("Target:")
            continue
        m = LUN_LINE.match(line)
        if m and current == decl.target_iqn and m.group(2) == "DIRECT_ACCESS":
            n = int(m.group(1))
            luns.append(LibiscsiLun(f"{decl.target_iqn}/{n}", n, lun_size(runner, decl, n, secret=secret, timeout=timeout)))
    return luns


def lun_size(runner: CommandRunner, decl: DatastoreDecl, lun: int, *, secret: str, timeout: float) -> int:
    argv = [qemuimg.QEMU_IMG, "info", "--output=json", "-f", "raw", lun_url(decl, lun)]
    try:
        data = qemuimg._json(runner.run(argv, timeout=timeout, env=chap_env(decl, secret)).stdout, " ".join(argv))
    except CommandError as exc:
        raise NotFound(f"LUN {lun} of {decl.target_iqn} on datastore {decl.name!r} cannot be opened: "
                       f"{exc.result.stderr.strip()[-300:]}") from None
    return int(data.get("virtual-size", 0))


def probe(runner: CommandRunner, decl: DatastoreDecl, *, initiator_iqn: str, secret: str, timeout: float) -> tuple[bool, str]:
    """Log in and report LUNs: I/O the target must answer (a stopped tgtd does not)."""
    argv = ["iscsi-ls"]
    if initiator_iqn:
        argv += ["-i", initiator_iqn]
    host, port = decl.portal_hosts()[0]
    argv.append(f"iscsi://{portal_url(host, port)}")
    out = runner.run(argv, timeout=timeout, env=chap_env(decl, secret)).stdout
    if f"Target:{decl.target_iqn} " not in out + " ":
        raise NotFound(f"target {decl.target_iqn} is not offered by {host}:{port}")
    return True, ""
