"""SAN LUNs as host block devices: the kernel iSCSI initiator, FC HBAs and DM-multipath.

Flow (the os-brick flow, without its known failures):

- iSCSI: one node record per portal with ``node.session.scan=manual`` and
  ``node.startup=manual`` (so the kernel never maps every LUN of the target by itself, and
  nothing logs in again at boot behind the agent's back), optional CHAP, login; then a
  *targeted* scan: "CHANNEL TARGET LUN" written to /sys/class/scsi_host/hostN/scan for each
  session of this target only, never "- - -" on the whole host.
- FC: the host's WWPNs from /sys/class/fc_host/host*/port_name; ``issue_lip`` then a scan of
  the remote ports whose WWPN is one of the datastore's target WWPNs.
- The LUN is found by WWN (the device's wwid, /dev/disk/by-id/wwn-0x...), within the
  datastore's scan timeout. Several paths -> ``multipath -a`` + ``multipath -r`` and the map
  found as /dev/disk/by-id/dm-uuid-mpath-3<wwn>.
- Resize: "1" > /sys/block/sdX/device/rescan for every path, then ``multipathd resize map``.
- Detach: ``multipath -f`` the map, ``blockdev --flushbufs`` and "1" > device/delete for every
  path, then log out when no LUN of the target is left. When the clean path fails the removal
  is forced (queueing off, ``dmsetup remove --force``, paths deleted anyway), because a LUN
  number later reused for another tenant must never reach a stale map (OSSA-2023-003).
- A LUN that never appears is a DEADLINE_EXCEEDED naming the LUN, and sessions this attempt
  opened are logged out again, so nothing is left half-attached.

All reads go through a ``root`` (the real "/" or a recorded sysfs/devfs tree under
tests/fixtures/scsi) and all commands and sysfs writes through a CommandRunner, so this code
runs unchanged on machines without a SCSI layer, against recorded trees.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from cna_agent.errors import AgentError, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from cna_agent.storage.model import WWN_RE, DatastoreDecl, check_secret_file, normalise_wwn
from cna_agent.storage.runner import CommandError, CommandRunner

log = logging.getLogger(__name__)
ISCSIADM_ALREADY_LOGGED_IN = 15
ISCSIADM_NO_OBJECTS = 21
POLL_S = 0.25


@dataclass(frozen=True)
class BlockLun:
    wwn: str
    #: What the guest gets: /dev/mapper/<map> with multipath, else /dev/disk/by-id/wwn-0x<wwn>.
    device: str
    size_bytes: int = 0
    vendor: str = ""
    product: str = ""
    paths: int = 0
    #: sdX names of the paths.
    disks: tuple[str, ...] = ()
    map_name: str = ""


class HostTree:
    """Reads the host's sysfs/devfs below ``root`` ("/" in production)."""

    def __init__(self, root: str = "/") -> None:
        self.root = root

    def p(self, *parts: str) -> str:
        return os.path.join(self.root, *[x.lstrip("/") for x in parts])

    def read(self, *parts: str, default: str = "") -> str:
        try:
            with open(self.p(*parts)) as fh:
                return fh.read().strip()
        except OSError:
            return default

    def glob(self, pattern: str) -> list[str]:
        return sorted(glob.glob(self.p(pattern)))

    # -- SCSI disks -----------------------------------------------------------------------------------

    def disks(self) -> list[str]:
        return [os.path.basename(d) for d in self.glob("sys/block/sd*")]

    def disk_address(self, disk: str) -> tuple[int, int, int, int] | None:
        """H:C:T:L of sdX from its device link (…/host3/session1/target3:0:0/3:0:0:1)."""
        real = os.path.realpath(self.p("sys/block", disk, "device"))
        m = re.fullmatch(r"(\d+):(\d+):(\d+):(\d+)", os.path.basename(real))
        return tuple(int(x) for x in m.groups()) if m else None  # type: ignore[return-value]

    def disk_wwn(self, disk: str) -> str:
        wwid = self.read("sys/block", disk, "device/wwid")
        # "naa.6a8ffba1005d5a0a0000000000000001" (t10./eui. ids are not WWNs; ignored)
        return normalise_wwn(wwid[4:]) if wwid.startswith("naa.") else ""

    def disk_size(self, disk: str) -> int:
        return int(self.read("sys/block", disk, "size", default="0") or 0) * 512

    def disks_by_wwn(self, wwn: str) -> list[str]:
        return [d for d in self.disks() if self.disk_wwn(d) == wwn]

    def multipath_map(self, wwn: str) -> tuple[str, str, list[str]] | None:
        """(dm-N, map name, slave disks) of the multipath map for ``wwn``."""
        link = self.p("dev/disk/by-id", f"dm-uuid-mpath-3{wwn}")
        if not os.path.lexists(link):
            return None
        dm = os.path.basename(os.path.realpath(link))
        name = self.read("sys/block", dm, "dm/name") or dm
        slaves = sorted(os.listdir(self.p("sys/block", dm, "slaves"))) if os.path.isdir(self.p("sys/block", dm, "slaves")) else []
        return dm, name, slaves

    # -- iSCSI sessions -------------------------------------------------------------------------------

    def iscsi_sessions(self, iqn: str) -> list[tuple[str, int, list[tuple[int, int]]]]:
        """(sessionN, host number, [(channel, target id)]) of every session to ``iqn``."""
        out = []
        for s in self.glob("sys/class/iscsi_session/session*"):
            if _read(os.path.join(s, "targetname")) != iqn:
                continue
            dev = os.path.realpath(os.path.join(s, "device"))
            host_m = re.fullmatch(r"host(\d+)", os.path.basename(os.path.dirname(dev)))
            if not host_m:
                continue
            targets = []
            for t in sorted(glob.glob(os.path.join(dev, "target*:*:*"))):
                m = re.fullmatch(r"target(\d+):(\d+):(\d+)", os.path.basename(t))
                if m:
                    targets.append((int(m.group(2)), int(m.group(3))))
            out.append((os.path.basename(s), int(host_m.group(1)), targets or [(0, 0)]))
        return out

    # -- FC -------------------------------------------------------------------------------------------

    def fc_hosts(self) -> list[tuple[int, str]]:
        out = []
        for h in self.glob("sys/class/fc_host/host*"):
            wwpn = _read(os.path.join(h, "port_name")).lower().removeprefix("0x")
            if wwpn:
                out.append((int(os.path.basename(h)[4:]), wwpn))
        return out

    def fc_targets(self, host: int) -> list[tuple[int, int, str]]:
        """(channel, target id, remote WWPN) of the FC targets seen through ``host``."""
        out = []
        for t in self.glob(f"sys/class/fc_transport/target{host}:*:*"):
            m = re.fullmatch(r"target(\d+):(\d+):(\d+)", os.path.basename(t))
            if m:
                out.append((int(m.group(2)), int(m.group(3)), _read(os.path.join(t, "port_name")).lower().removeprefix("0x")))
        return out


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


class BlockSan:
    """Shared part of the kernel iSCSI and FC back-ends: find, multipath, resize, remove."""

    def __init__(self, decl: DatastoreDecl, runner: CommandRunner, root: str = "/", *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, command_timeout: float = 60.0) -> None:
        self.decl = decl
        self.runner = runner
        self.tree = HostTree(root)
        self.clock = clock
        self.sleep = sleep
        self.timeout = command_timeout

    # -- hooks ----------------------------------------------------------------------------------------

    def _scan(self, lun: int | None) -> None:
        raise NotImplementedError

    def _parse_lun(self, lun_id: str, field: str) -> tuple[int | None, str]:
        """(LUN number or None, WWN or "") from the caller's id."""
        raise NotImplementedError

    def _known_wwns(self) -> list[str]:
        raise NotImplementedError

    def _after_failed_attach(self) -> None:
        """Undo what this attempt opened (iSCSI: log out again)."""

    # -- shared ---------------------------------------------------------------------------------------

    def _wait_for(self, find: Callable[[], str], what: str) -> str:
        deadline = self.clock() + self.decl.scan_timeout_s
        while True:
            got = find()
            if got:
                return got
            if self.clock() >= deadline:
                raise DeadlineExceeded(f"{what} did not appear within {self.decl.scan_timeout_s:g}s after the scan")
            self.sleep(POLL_S)

    def lun_info(self, wwn: str) -> BlockLun | None:
        disks = self.tree.disks_by_wwn(wwn)
        mp = self.tree.multipath_map(wwn)
        if not disks and mp is None:
            return None
        first = disks[0] if disks else (mp[2][0] if mp and mp[2] else "")
        if mp is not None:
            device = self.tree.p("dev/mapper", mp[1])
            size = int(self.tree.read("sys/block", mp[0], "size", default="0") or 0) * 512
            paths = len(mp[2])
        else:
            device = self.tree.p("dev/disk/by-id", f"wwn-0x{wwn}")
            if not os.path.lexists(device):
                device = self.tree.p("dev", first)
            size = self.tree.disk_size(first)
            paths = len(disks)
        return BlockLun(wwn=wwn, device=device, size_bytes=size, vendor=self.tree.read("sys/block", first, "device/vendor"),
                        product=self.tree.read("sys/block", first, "device/model"), paths=paths,
                        disks=tuple(disks or (mp[2] if mp else ())), map_name=mp[1] if mp else "")

    def list_luns(self) -> list[BlockLun]:
        return [lun for lun in (self.lun_info(w) for w in self._known_wwns()) if lun is not None]

    def attach(self, lun_id: str, field: str) -> BlockLun:
        number, wwn = self._parse_lun(lun_id, field)
        try:
            self._scan(number)
            if wwn:
                what = f"LUN {wwn} of datastore {self.decl.name!r}"
                self._wait_for(lambda: (self.tree.disks_by_wwn(wwn) or [""])[0], what)
            else:
                what = f"LUN {number} of {self.decl.target_iqn} (datastore {self.decl.name!r})"
                disk = self._wait_for(lambda: self._disk_at_lun(number), what)  # type: ignore[arg-type]
                wwn = self.tree.disk_wwn(disk)
                if not wwn:
                    raise FailedPrecondition(f"{what} ({disk}) reports no NAA WWN; refusing a disk that cannot be identified")
        except AgentError:
            self._after_failed_attach()
            raise
        self._multipath(wwn)
        lun = self.lun_info(wwn)
        if lun is None:
            raise NotFound(f"LUN {wwn} vanished right after the scan", field=field)
        return lun

    def _disk_at_lun(self, number: int) -> str:
        raise NotImplementedError

    def _multipath(self, wwn: str) -> None:
        disks = self.tree.disks_by_wwn(wwn)
        if len(disks) < 2 or self.tree.multipath_map(wwn) is not None:
            return
        try:
            self.runner.run(["multipath", "-a", f"/dev/{disks[0]}"], timeout=self.timeout)
            self.runner.run(["multipath", "-r"], timeout=self.timeout)
        except FailedPrecondition as exc:
            log.warning("event=multipath.failed wwn=%s error=%s", wwn, exc.message)
            return
        try:
            self._wait_for(lambda: "x" if self.tree.multipath_map(wwn) else "", f"multipath map of {wwn}")
        except DeadlineExceeded:
            log.warning("event=multipath.no_map wwn=%s paths=%d; using a single path", wwn, len(disks))

    def resize(self, wwn: str) -> BlockLun:
        """Rescan every path of the LUN after the array grew it; returns the new size."""
        wwn = normalise_wwn(wwn)
        lun = self.lun_info(wwn)
        if lun is None:
            raise NotFound(f"LUN {wwn} is not attached on this host", field="lun_id")
        for disk in lun.disks:
            self.runner.write(self.tree.p("sys/block", disk, "device/rescan"), "1", timeout=self.timeout)
        if lun.map_name:
            self.runner.run(["multipathd", "resize", "map", lun.map_name], timeout=self.timeout)
        return self.lun_info(wwn) or lun

    def detach(self, wwn: str, *, force: bool = False) -> list[str]:
        """Remove the LUN's map and every path; returns what had to be forced (empty = clean)."""
        wwn = normalise_wwn(wwn)
        lun = self.lun_info(wwn)
        forced: list[str] = []
        if lun is None:
            return forced
        if lun.map_name:
            flushed = False
            if not force:
                try:
                    self.runner.run(["multipath", "-f", lun.map_name], timeout=self.timeout)
                    flushed = True
                except (FailedPrecondition, DeadlineExceeded) as exc:
                    log.warning("event=multipath.flush_failed map=%s error=%s; forcing", lun.map_name, exc.message)
            if not flushed:
                forced.append(f"map {lun.map_name}")
                for argv in (["multipathd", "disablequeueing", "map", lun.map_name],
                             ["dmsetup", "message", lun.map_name, "0", "fail_if_no_path"],
                             ["dmsetup", "remove", "--force", "--retry", lun.map_name]):
                    try:
                        self.runner.run(argv, timeout=self.timeout)
                    except (FailedPrecondition, DeadlineExceeded) as exc2:
                        log.warning("event=multipath.force_step_failed argv=%s error=%s", argv, exc2.message)
        for disk in lun.disks:
            try:
                self.runner.run(["blockdev", "--flushbufs", f"/dev/{disk}"], timeout=self.timeout)
            except (FailedPrecondition, DeadlineExceeded) as exc:
                forced.append(f"flush {disk}")
                log.warning("event=scsi.flush_failed disk=%s error=%s", disk, exc.message)
            self.runner.write(self.tree.p("sys/block", disk, "device/delete"), "1", timeout=self.timeout)
        self._after_detach()
        return forced

    def _after_detach(self) -> None:
        pass

    def wwn_of(self, lun_id: str, field: str) -> str:
        """The WWN of the LUN a VM spec names (number, "<iqn>/<n>" or WWN) as attached on this
        host now, or "" when it is not attached here. Never scans: releasing a LUN, and telling
        whether another VM's disk is the same LUN under another spelling, must not map LUNs."""
        number, wwn = self._parse_lun(lun_id, field)
        if wwn:
            return wwn if self.lun_info(wwn) is not None else ""
        disk = self._disk_at_lun(number)  # type: ignore[arg-type]
        return self.tree.disk_wwn(disk) if disk else ""

    def close_idle(self) -> bool:
        """Drop host state left without any LUN (iSCSI: a session whose LUNs are all gone, e.g.
        after a logout that failed); True when something was closed. FC has nothing of the kind."""
        return False

    def probe(self) -> tuple[bool, str]:
        """Direct-I/O read of the first LUN present (raises when none is)."""
        from cna_agent.storage.monitor import direct_read_probe

        luns = self.list_luns()
        if not luns:
            raise FileNotFoundError(f"no LUN of datastore {self.decl.name!r} is present on this host")
        return direct_read_probe(luns[0].device)


class KernelIscsi(BlockSan):
    def _portals(self) -> list[str]:
        return [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.decl.portal_hosts()]

    def _iscsiadm(self, *args: str, ok: Iterable[int] = ()) -> str:
        try:
            return self.runner.run(["iscsiadm", *args], timeout=self.timeout).stdout
        except CommandError as exc:
            if exc.result.returncode in tuple(ok):
                return exc.result.stdout
            raise

    def discover(self) -> list[str]:
        """SendTargets discovery on the first portal; the datastore's target must be offered."""
        out = self._iscsiadm("-m", "discovery", "-t", "sendtargets", "-p", self._portals()[0], "-o", "nonpersistent")
        targets = [line.split()[1] for line in out.splitlines() if len(line.split()) >= 2]
        if self.decl.target_iqn not in targets:
            raise NotFound(f"portal {self._portals()[0]} does not offer target {self.decl.target_iqn} "
                           f"(offered: {', '.join(targets) or 'none'})")
        return targets

    def login(self) -> list[str]:
        """Node records with manual scan/startup, CHAP, login on every portal; returns portals newly logged in."""
        if self.tree.iscsi_sessions(self.decl.target_iqn) and len(self.tree.iscsi_sessions(self.decl.target_iqn)) >= len(self._portals()):
            return []
        self.discover()
        secret = check_secret_file(self.decl.chap_secret_file, "chap_secret_file") if self.decl.chap_user else ""
        opened = []
        for portal in self._portals():
            node = ["-m", "node", "-T", self.decl.target_iqn, "-p", portal]
            self._iscsiadm(*node, "-o", "new")
            settings = [("node.session.scan", "manual"), ("node.startup", "manual"),
                        ("node.session.timeo.replacement_timeout", str(self.decl.replacement_timeout_s))]
            if self.decl.chap_user:
                settings += [("node.session.auth.authmethod", "CHAP"), ("node.session.auth.username", self.decl.chap_user),
                             ("node.session.auth.password", secret)]
            for key, value in settings:
                self._iscsiadm(*node, "-o", "update", "-n", key, "-v", value)
            self._iscsiadm(*node, "--login", ok=(ISCSIADM_ALREADY_LOGGED_IN,))
            opened.append(portal)
        return opened

    def logout(self) -> None:
        for portal in self._portals():
            node = ["-m", "node", "-T", self.decl.target_iqn, "-p", portal]
            self._iscsiadm(*node, "--logout", ok=(ISCSIADM_NO_OBJECTS,))
            self._iscsiadm(*node, "-o", "delete", ok=(ISCSIADM_NO_OBJECTS,))

    def _parse_lun(self, lun_id: str, field: str) -> tuple[int | None, str]:
        iqn, sep, num = lun_id.rpartition("/")
        if sep and iqn != self.decl.target_iqn:
            raise InvalidArgument(field, f"{lun_id!r}: datastore {self.decl.name!r} serves {self.decl.target_iqn}, not {iqn}")
        if num.isdigit() and int(num) <= 16383:
            return int(num), ""
        if WWN_RE.match(lun_id.replace(":", "").removeprefix("0x")):
            return None, normalise_wwn(lun_id)
        raise InvalidArgument(field, f"{lun_id!r} is neither a LUN number, '<iqn>/<lun>' nor a WWN")

    def _scan(self, lun: int | None) -> None:
        self._opened = self.login()
        sessions = self.tree.iscsi_sessions(self.decl.target_iqn)
        if not sessions:
            raise FailedPrecondition(f"no iSCSI session to {self.decl.target_iqn} after login")
        for _, host, targets in sessions:
            for channel, target in targets:
                self.runner.write(self.tree.p("sys/class/scsi_host", f"host{host}", "scan"),
                                  f"{channel} {target} {'-' if lun is None else lun}", timeout=self.timeout)

    def _disk_at_lun(self, number: int) -> str:
        hosts = {h for _, h, _ in self.tree.iscsi_sessions(self.decl.target_iqn)}
        for disk in self.tree.disks():
            addr = self.tree.disk_address(disk)
            if addr and addr[0] in hosts and addr[3] == number:
                return disk
        return ""

    def _target_disks(self) -> list[str]:
        hosts = {h for _, h, _ in self.tree.iscsi_sessions(self.decl.target_iqn)}
        return [d for d in self.tree.disks() if (a := self.tree.disk_address(d)) and a[0] in hosts]

    def _known_wwns(self) -> list[str]:
        return sorted({w for d in self._target_disks() if (w := self.tree.disk_wwn(d))})

    def _after_failed_attach(self) -> None:
        # Log out again only if no other LUN of this target is mapped (others may be in use).
        if getattr(self, "_opened", None) and not self._target_disks():
            self.logout()

    def _after_detach(self) -> None:
        if not self._target_disks():
            self.logout()

    def close_idle(self) -> bool:
        if self.tree.iscsi_sessions(self.decl.target_iqn) and not self._target_disks():
            self.logout()
            return True
        return False

    def rescan(self) -> None:
        self._scan(None)


class FibreChannel(BlockSan):
    def _parse_lun(self, lun_id: str, field: str) -> tuple[int | None, str]:
        if not WWN_RE.match(lun_id.replace(":", "").removeprefix("0x")):
            raise InvalidArgument(field, f"{lun_id!r} is not a LUN WWN (16 or 32 hex digits)")
        wwn = normalise_wwn(lun_id)
        if self.decl.lun_wwns and wwn not in self.decl.lun_wwns:
            raise InvalidArgument(field, f"LUN {wwn} is not one of datastore {self.decl.name!r}'s lun_wwns")
        return None, wwn

    def host_wwpns(self) -> list[str]:
        return [w for _, w in self.tree.fc_hosts()]

    def _scan(self, lun: int | None) -> None:
        hosts = self.tree.fc_hosts()
        if not hosts:
            raise FailedPrecondition("this host has no FC HBA (/sys/class/fc_host is empty)")
        for host, _ in hosts:
            self.runner.write(self.tree.p("sys/class/fc_host", f"host{host}", "issue_lip"), "1", timeout=self.timeout)
            targets = [(c, t) for c, t, wwpn in self.tree.fc_targets(host) if not self.decl.target_wwpns or wwpn in self.decl.target_wwpns]
            for channel, target in targets:
                self.runner.write(self.tree.p("sys/class/scsi_host", f"host{host}", "scan"), f"{channel} {target} -", timeout=self.timeout)

    def _known_wwns(self) -> list[str]:
        return list(self.decl.lun_wwns)

    def rescan(self) -> None:
        self._scan(None)


def backends_for(datastores: Iterable[DatastoreDecl], runner: CommandRunner, root: str = "/") -> Mapping[str, BlockSan]:
    out: dict[str, BlockSan] = {}
    for d in datastores:
        if d.type == "iscsi" and d.initiator == "kernel":
            out[d.name] = KernelIscsi(d, runner, root)
        elif d.type == "fc":
            out[d.name] = FibreChannel(d, runner, root)
    return out
