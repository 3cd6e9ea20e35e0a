#!/usr/bin/env python3
"""Bring up / tear down the real daemons integration tests need (no systemd required).

Why: integration tests run against real libvirtd, Open vSwitch and tgtd (DESIGN.md, "What runs
where in tests"), on CI machines and containers where systemd is not PID 1 and the OVS kernel
module is absent. This script starts what is missing, in a private run directory, waits until each
daemon answers, and later stops only what it started.

CLI::

    tools/testbed.py up     [--dir D] [--only libvirtd,ovs,tgtd,hosts] [--install]
    tools/testbed.py down   [--dir D]
    tools/testbed.py status [--dir D]          # JSON: per service running/started-by-us/pids
    tools/testbed.py env    [--dir D]          # shell KEY=VALUE lines (eval "$(... env)")

Run dir: ``--dir``, else ``$CNA_TESTBED_DIR``, else ``<repo>/.cache/testbed``.

Services:

* ``libvirtd``: ``virtlogd -d`` and ``libvirtd -d`` (reused when ``virsh -c qemu:///system
  version`` already answers; then ``down`` leaves them alone). hugetlbfs is mounted at
  /dev/hugepages first when the host has no hugetlbfs mount (libvirtd looks only at start-up).
* ``ovs``: a private ovsdb-server (DB, socket, logs under ``<dir>/ovs``) and an ovs-vswitchd
  pointed at it; bridges must use ``datapath_type=netdev`` (no kernel module).
* ``tgtd``: tgtd with its iSCSI portal bound to 127.0.0.1:3260 only (``--iscsi portal=``) and a
  private management control port, so a host tgtd is never touched.
* ``hosts`` (only when named): two more libvirtds, "host A" and "host B", for migration between
  two hosts on one machine. Each runs in its own mount namespace (``unshare --mount
  --propagation private`` holding it, ``nsenter`` for every step) with a tmpfs on /run (its
  sockets, pid files, virtlogd and the QEMU pid files are private), bind mounts of private
  copies over /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt and /etc/libvirt (config
  files only: its own ``host_uuid``, a TCP listener on 127.0.0.1 without auth, distinct
  migration and display port ranges, HOST_DEFAULTS) and its own cgroup directory per
  hierarchy. Both share the machine's network namespace, /dev (so /dev/hugepages), /tmp and
  every other path; QEMU runs as the Debian default user (libvirt-qemu). The host's own
  libvirtd (/run/libvirt, qemu:///system) is never touched. Reach them at
  ``qemu+tcp://127.0.0.1:PORT/system``; ``down`` kills each host's libvirtd, its QEMU
  processes, its virtlogd and the holder (the namespace and its mounts go with them), then
  removes its cgroup directories and private dirs.

Python API (stdlib only; import with ``sys.path`` pointing at tools/ or by file path)::

    tb = Testbed(run_dir)            # run_dir optional
    tb.up(["libvirtd", "ovs", "tgtd"], install=False)   # idempotent; waits for readiness
    tb.env() -> dict[str, str]       # CNA_TESTBED_OVSDB, CNA_TESTBED_LIBVIRT_URI, ...
    tb.ovsdb_remote                  # "unix:<dir>/ovs/db.sock"
    tb.libvirt_uri                   # "qemu:///system"
    tb.iscsi_portal                  # "127.0.0.1:3260"
    tb.iscsi_create_target(iqn, [Path("lun1.img"), ...]) -> tid (LUN n = n-th file, from 1)
    tb.iscsi_create_target(iqn, luns, chap=("user", "secret"))  # only that CHAP account may log in
    tb.iscsi_delete_target(iqn)      # its CHAP account goes with it
    tb.status() -> dict;  tb.down()  # stops only daemons this run dir started
    tb.up(["hosts"]) / tb.hosts_up({"a": {}, "b": {"tcp_port": 16600}}) -> {name: NamespaceHost}
    tb.hosts() -> {name: NamespaceHost}   # .uri .tcp_port .host_uuid .migration_ports
                                          # .display_ports .libvirtd_pid .virtlogd_pid .root
                                          # .qemu_pids() -> {domain: pid}  .pids()
    tb.hosts_down()

Module-level ``iscsi_create_target`` / ``iscsi_delete_target`` use ``Testbed()`` (default dir).
Errors are ``TestbedError`` carrying the failing command and its stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVICES = ("libvirtd", "ovs", "tgtd")
#: Brought up only when asked for (``--only hosts``): two more libvirtds, "host A" and "host B",
#: each in its own mount namespace (migration tests).
OPTIONAL_SERVICES = ("hosts",)
LIBVIRT_URI = "qemu:///system"
ISCSI_PORTAL = "127.0.0.1:3260"
TGT_CONTROL_PORT = 4260  # private tgtd management socket: /var/run/tgtd/socket.<port>

PACKAGES = {
    "libvirtd": ["libvirt-daemon-system", "libvirt-daemon-driver-qemu", "libvirt-clients",
                 "qemu-system-x86", "qemu-system-arm", "qemu-efi-aarch64", "qemu-utils",
                 "qemu-block-extra"],
    "ovs": ["openvswitch-switch", "nftables", "ethtool"],
    "tgtd": ["tgt", "libiscsi-bin"],
    "hosts": ["libvirt-daemon-system", "libvirt-daemon-driver-qemu", "libvirt-clients", "qemu-system-x86",
              "qemu-utils"],
}
COMMANDS = {
    "libvirtd": ["libvirtd", "virtlogd", "virsh"],
    "ovs": ["ovsdb-server", "ovs-vswitchd", "ovsdb-tool", "ovs-vsctl", "ovs-appctl"],
    "tgtd": ["tgtd", "tgtadm"],
    "hosts": ["libvirtd", "virtlogd", "virsh", "unshare", "nsenter"],
}
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class TestbedError(RuntimeError):
    """A testbed step failed; the message names the command and carries its stderr."""


def run(cmd: list[str], timeout: float = 60, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run an argument list with a timeout; on failure raise with stderr in the message."""
    e = dict(os.environ)
    e["PATH"] = e.get("PATH", "") + ":" + SBIN_PATH
    if env:
        e.update(env)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise TestbedError(f"{cmd} timed out after {timeout}s") from exc
    except FileNotFoundError as exc:
        raise TestbedError(f"{cmd[0]} not found (try `tools/testbed.py up --install`)") from exc
    if check and p.returncode != 0:
        raise TestbedError(f"{cmd} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return p


def _ok(cmd: list[str], timeout: float = 10) -> bool:
    try:
        return run(cmd, timeout=timeout, check=False).returncode == 0
    except TestbedError:
        return False


def _wait(what: str, probe, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        if time.monotonic() > deadline:
            raise TestbedError(f"{what} did not answer within {timeout}s")
        time.sleep(0.2)


def _pid_alive(pid: int, comm: str | None = None) -> bool:
    """True if pid runs and (when given) its command name starts with comm (guards PID reuse)."""
    try:
        got = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return comm is None or got.startswith(comm[:15])


def _unix_answers(path: str) -> bool:
    """True if something accepts connections on the unix socket (a stale file does not count)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


#: The sysctl that lets an unprivileged QEMU use userfaultfd (post-copy migration).
USERFAULTFD_KNOB = Path("/proc/sys/vm/unprivileged_userfaultfd")


def ensure_hugetlbfs(mount_point: str = "/dev/hugepages") -> str:
    """Mount hugetlbfs at ``mount_point`` unless one is mounted already; return a mount point.

    A booted systemd host has /dev/hugepages (dev-hugepages.mount); containers and CI machines
    without systemd do not, and libvirtd, which looks for hugetlbfs mounts only when it starts,
    then refuses every guest with <hugepages> ("hugetlbfs filesystem is not mounted").
    """
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "hugetlbfs":
            return fields[1]
    Path(mount_point).mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", "hugetlbfs", "hugetlbfs", mount_point], timeout=30)
    return mount_point


def _tcp_answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# ----- two libvirt "hosts" on this machine (mount namespaces) ---------------------------------
#: What each namespace host gets unless the caller says otherwise: its libvirtd's TCP port
#: (moved to a free one when taken), QEMU's incoming-migration ports and VNC/SPICE ports. The
#: ranges are distinct per host because both hosts share this machine's network namespace, and
#: they stay clear of the host libvirtd's defaults (migration 49152-49215, displays from 5900).
HOST_DEFAULTS = {
    "a": {"tcp_port": 16510, "migration_ports": (49260, 49279), "display_ports": (6200, 6219)},
    "b": {"tcp_port": 16511, "migration_ports": (49280, 49299), "display_ports": (6220, 6239)},
}
#: The system paths each host gets a private copy of (bind mounts over them inside its
#: namespace); /run is a fresh tmpfs instead, so sockets and pid files never meet the host's.
HOST_BIND_DIRS = {"lib": "/var/lib/libvirt", "cache": "/var/cache/libvirt", "log": "/var/log/libvirt",
                  "etc": "/etc/libvirt"}
#: The /etc/libvirt entries a host copies: the daemons' config files and the stock nwfilters;
#: never the host's domains, networks, storage pools or secrets (qemu/, storage/, secrets/),
#: which would start the host's guests or its virbr0 a second time.
HOST_ETC_DIRS = ("nwfilter", "hooks")


def _mnt_ns(pid: int) -> str | None:
    """The mount namespace of pid ("mnt:[4026532187]"), None when it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _ns_members(ns: str) -> list[int]:
    """Every process in mount namespace ns (QEMU, libvirtd, virtlogd, helpers such as swtpm)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _mnt_ns(int(entry)) == ns:
            out.append(int(entry))
    return out


def _port_free(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _pick_port(preferred: int, taken: set[int]) -> int:
    """preferred when nothing listens there, else a port the kernel hands out (free right now)."""
    if preferred not in taken and _port_free(preferred):
        return preferred
    while True:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        if port not in taken:
            return port


def _set_conf(path: Path, values: dict[str, object]) -> None:
    """Set keys in a libvirt .conf file: active lines for those keys are dropped and the values
    appended (libvirt reads the first occurrence of a key, so appending alone would not win)."""
    keys = set(values)
    kept = [line for line in path.read_text().splitlines()
            if not (m := re.match(r"\s*([A-Za-z_]+)\s*=", line)) or m.group(1) not in keys]
    kept.append("# set by tools/testbed.py for a namespace host")
    for k, v in values.items():
        kept.append(f"{k} = {json.dumps(v) if isinstance(v, str) else v}")
    path.write_text("\n".join(kept) + "\n")


def _cgroup_mounts() -> list[str]:
    """Mount points of the cgroup hierarchies (v1 controllers and the v2/unified one)."""
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        f = line.split()
        if len(f) >= 3 and f[2] in ("cgroup", "cgroup2"):
            out.append(f[1])
    return out


def _rmdir_tree(top: Path) -> None:
    """rmdir a cgroup directory tree bottom-up (cgroup dirs hold only kernel files, which go with
    the directory; rm -r would fail on them)."""
    if not top.is_dir():
        return
    for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass
    try:
        top.rmdir()
    except OSError:
        pass


class NamespaceHost:
    """One libvirt "host" of the testbed: a libvirtd (and its virtlogd, and the QEMU it starts)
    in a mount namespace of its own, reached over TCP on loopback. Built from the state file."""

    def __init__(self, name: str, rec: dict) -> None:
        self.name = name
        self.dir = Path(rec["dir"])
        self.tcp_port: int = rec["tcp_port"]
        self.host_uuid: str = rec["host_uuid"]
        self.migration_ports: tuple[int, int] = tuple(rec["migration_ports"])
        self.display_ports: tuple[int, int] = tuple(rec["display_ports"])
        self.holder_pid: int = rec["holder_pid"]
        self.mnt_ns: str = rec["mnt_ns"]
        self.libvirtd_pid: int | None = rec.get("libvirtd_pid")
        self.virtlogd_pid: int | None = rec.get("virtlogd_pid")
        self.cgroups: list[str] = rec.get("cgroups", [])

    @property
    def uri(self) -> str:
        return f"qemu+tcp://127.0.0.1:{self.tcp_port}/system"

    @property
    def root(self) -> Path:
        """This host's view of the file system (its /run, /var/lib/libvirt ...), from outside."""
        return Path(f"/proc/{self.holder_pid}/root")

    def cgroup_pids(self) -> set[int]:
        """Processes in this host's cgroup directories (libvirt puts each QEMU there)."""
        out: set[int] = set()
        for d in self.cgroups:
            for f in Path(d).rglob("cgroup.procs"):
                try:
                    out.update(int(x) for x in f.read_text().split())
                except (OSError, ValueError):
                    pass
        return out

    def pids(self) -> list[int]:
        """Every process of this host: the members of its mount namespace, and the QEMU
        processes, which libvirt runs each in a mount namespace of its own (qemu.conf
        ``namespaces``, a private /dev): those are found by cgroup and by pid file."""
        found = set(self.qemu_pids().values()) | self.cgroup_pids()
        # the namespace is this host's while a process we started is in it (its id can be
        # reused once the namespace is gone)
        if any(_mnt_ns(p or 0) == self.mnt_ns for p in (self.holder_pid, self.libvirtd_pid, self.virtlogd_pid)):
            found.update(_ns_members(self.mnt_ns))
        return sorted(p for p in found if _pid_alive(p))

    def qemu_pids(self) -> dict[str, int]:
        """domain name -> QEMU pid, from the pid files libvirtd keeps in its private
        /run/libvirt/qemu (read through the holder's /proc/<pid>/root), each checked to be a
        live QEMU process in this host's cgroups (or, without cgroups, its mount namespace)."""
        out: dict[str, int] = {}
        run_dir = self.root / "run" / "libvirt" / "qemu"
        try:
            files = sorted(run_dir.glob("*.pid"))
        except OSError:
            return out
        mine = self.cgroup_pids()
        for f in files:
            pid = _read_pid(f)
            if pid and _pid_alive(pid, "qemu-system") and (pid in mine or not self.cgroups):
                out[f.stem] = pid
        return out

    def answers(self) -> bool:
        return _ok(["virsh", "-c", self.uri, "version"], timeout=15)

    def as_dict(self) -> dict:
        return {"uri": self.uri, "tcp_port": self.tcp_port, "host_uuid": self.host_uuid,
                "migration_ports": list(self.migration_ports), "display_ports": list(self.display_ports),
                "libvirtd_pid": self.libvirtd_pid, "virtlogd_pid": self.virtlogd_pid,
                "holder_pid": self.holder_pid, "mnt_ns": self.mnt_ns, "dir": str(self.dir)}


def _running(pid: int) -> bool:
    """pid exists and is not a zombie (daemons re-parented to a PID 1 that reaps slowly stay
    zombies for a while after they exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _terminate(pids: list[int], grace: float) -> None:
    """SIGTERM pids, SIGKILL what is left after grace seconds; reap any that are our children."""
    def reap() -> None:
        for pid in pids:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass

    def alive() -> list[int]:
        reap()
        return [p for p in pids if _running(p)]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 10)
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)


class Testbed:
    """The daemons of one run directory; see the module docstring for the API."""

    def __init__(self, run_dir: Path | str | None = None) -> None:
        d = run_dir or os.environ.get("CNA_TESTBED_DIR") or REPO / ".cache" / "testbed"
        self.dir = Path(d).resolve()
        self.state_file = self.dir / "state.json"

    # ----- addresses --------------------------------------------------------------------------
    @property
    def ovs_dir(self) -> Path:
        return self.dir / "ovs"

    @property
    def ovsdb_remote(self) -> str:
        return f"unix:{self.ovs_dir / 'db.sock'}"

    @property
    def libvirt_uri(self) -> str:
        return LIBVIRT_URI

    @property
    def iscsi_portal(self) -> str:
        return ISCSI_PORTAL

    def env(self) -> dict[str, str]:
        return {
            "CNA_TESTBED_DIR": str(self.dir),
            "CNA_TESTBED_LIBVIRT_URI": self.libvirt_uri,
            "CNA_TESTBED_OVSDB": self.ovsdb_remote,
            "CNA_TESTBED_ISCSI_PORTAL": self.iscsi_portal,
            "CNA_TESTBED_TGT_CONTROL_PORT": str(TGT_CONTROL_PORT),
            **{f"CNA_TESTBED_HOST_{n.upper()}_URI": h.uri for n, h in self.hosts().items()},
        }

    # ----- state: which pids we started ------------------------------------------------------
    def _state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def _save(self, state: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.state_file)

    def _record(self, service: str, procs: list[tuple[int, str]]) -> None:
        """Remember pids we started (merged with earlier live records, so repeated `up` keeps them)."""
        st = self._state()
        old = [tuple(x) for x in st.get(service, {}).get("pids", []) if _pid_alive(x[0], x[1])]
        merged = list(dict.fromkeys(old + [tuple(x) for x in procs]))
        st[service] = {"pids": [list(x) for x in merged]}
        self._save(st)

    # ----- readiness probes ------------------------------------------------------------------
    def _libvirt_ok(self) -> bool:
        return _ok(["virsh", "-c", self.libvirt_uri, "version"], timeout=15)

    def _ovs_ok(self) -> bool:
        return _ok(["ovs-vsctl", f"--db={self.ovsdb_remote}", "--timeout=5", "show"])

    def _vswitchd_ok(self) -> bool:
        pid = _read_pid(self.ovs_dir / "ovs-vswitchd.pid")
        return bool(pid and _pid_alive(pid, "ovs-vswitchd"))

    def _tgt_ok(self) -> bool:
        return _ok(["tgtadm", "-C", str(TGT_CONTROL_PORT), "--lld", "iscsi", "--mode", "target",
                    "--op", "show"])

    # ----- up ------------------------------------------------------------------------------------
    def up(self, services: list[str] | tuple[str, ...] | None = None, install: bool = False) -> None:
        """Start the missing daemons (idempotent) and wait until each answers."""
        services = list(services or SERVICES)
        bad = [s for s in services if s not in SERVICES + OPTIONAL_SERVICES]
        if bad:
            raise TestbedError(f"unknown service(s) {bad}; choose from {list(SERVICES + OPTIONAL_SERVICES)}")
        self.dir.mkdir(parents=True, exist_ok=True)
        if install:
            self.install(services)
        for s in services:
            missing = [c for c in COMMANDS[s] if not shutil.which(c, path=os.environ.get("PATH", "") + ":" + SBIN_PATH)]
            if missing:
                raise TestbedError(f"{s}: commands {missing} not installed (use --install)")
        for s in services:
            getattr(self, f"_up_{s}")()

    def install(self, services: list[str]) -> None:
        """apt-get install the Debian packages of services that are not installed yet."""
        want = [p for s in services for p in PACKAGES[s]]
        missing = []
        for p in want:
            r = run(["dpkg-query", "-W", "-f=${Status}", p], check=False, timeout=30)
            if r.returncode != 0 or "install ok installed" not in r.stdout:
                missing.append(p)
        if not missing:
            return
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-q"], timeout=600, env=env)
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], timeout=1800, env=env)

    def _up_libvirtd(self) -> None:
        if self._libvirt_ok():
            return
        started: list[tuple[int, str]] = []
        Path("/run/libvirt").mkdir(parents=True, exist_ok=True)
        if not _unix_answers("/run/libvirt/virtlogd-sock"):
            run(["virtlogd", "-d"], timeout=30)
            _wait("virtlogd", lambda: _unix_answers("/run/libvirt/virtlogd-sock"), 15)
            pid = _read_pid(Path("/run/virtlogd.pid"))
            if pid:
                started.append((pid, "virtlogd"))
        ensure_hugetlbfs()  # libvirtd finds hugetlbfs mounts only when it starts
        run(["libvirtd", "-d"], timeout=30)
        self._record("libvirtd", started)
        _wait("libvirtd", self._libvirt_ok, 60)
        pid = _read_pid(Path("/run/libvirtd.pid"))
        if pid:
            started.append((pid, "libvirtd"))
        self._record("libvirtd", started)

    def _up_ovs(self) -> None:
        d = self.ovs_dir
        d.mkdir(parents=True, exist_ok=True)
        Path("/var/run/openvswitch").mkdir(parents=True, exist_ok=True)
        procs: list[tuple[int, str]] = []
        if not self._ovs_ok():
            db = d / "conf.db"
            if not db.exists():
                schema = Path("/usr/share/openvswitch/vswitch.ovsschema")
                run(["ovsdb-tool", "create", str(db), str(schema)], timeout=30)
            run(["ovsdb-server", str(db), f"--remote=punix:{d / 'db.sock'}",
                 f"--pidfile={d / 'ovsdb-server.pid'}", f"--unixctl={d / 'ovsdb-server.ctl'}",
                 f"--log-file={d / 'ovsdb-server.log'}", "--detach"], timeout=30)
            _wait("ovsdb-server", lambda: (d / "db.sock").exists(), 15)
            run(["ovs-vsctl", f"--db={self.ovsdb_remote}", "--no-wait", "init"], timeout=30)
            pid = _read_pid(d / "ovsdb-server.pid")
            if pid:
                procs.append((pid, "ovsdb-server"))
        else:
            procs += [tuple(p) for p in self._state().get("ovs", {}).get("pids", []) if p[1] == "ovsdb-server"]
        if not self._vswitchd_ok():
            # OVS_RUNDIR: the bridges' OpenFlow management sockets (<bridge>.mgmt) go next to
            # db.sock, where OVS tools and the agent look for a private instance's run directory.
            run(["ovs-vswitchd", self.ovsdb_remote, f"--pidfile={d / 'ovs-vswitchd.pid'}",
                 f"--unixctl={d / 'ovs-vswitchd.ctl'}", f"--log-file={d / 'ovs-vswitchd.log'}",
                 "--detach"], timeout=60, env={"OVS_RUNDIR": str(d)})
            pid = _read_pid(d / "ovs-vswitchd.pid")
            if pid:
                procs.append((pid, "ovs-vswitchd"))
        else:
            procs += [tuple(p) for p in self._state().get("ovs", {}).get("pids", []) if p[1] == "ovs-vswitchd"]
        self._record("ovs", procs)
        _wait("ovsdb-server", self._ovs_ok, 30)
        # vswitchd answers on its control socket once its main loop runs
        _wait("ovs-vswitchd", lambda: _ok(["ovs-appctl", "-t", str(d / "ovs-vswitchd.ctl"), "version"]), 30)

    def _up_tgtd(self) -> None:
        if self._tgt_ok():
            return
        log = (self.dir / "tgtd.log").open("ab")
        try:
            p = subprocess.Popen(
                ["tgtd", "-f", "-C", str(TGT_CONTROL_PORT), "--iscsi", f"portal={ISCSI_PORTAL}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives this CLI process; `down` stops it by pid
                env={**os.environ, "PATH": os.environ.get("PATH", "") + ":" + SBIN_PATH})
        finally:
            log.close()
        self._record("tgtd", [(p.pid, "tgtd")])
        host, port = ISCSI_PORTAL.rsplit(":", 1)
        try:
            # the management socket answers before the iSCSI portal may be listening
            _wait("tgtd", lambda: p.poll() is None and self._tgt_ok() and _tcp_answers(host, int(port)), 20)
        except TestbedError as e:
            tail = (self.dir / "tgtd.log").read_text(errors="replace")[-1500:]
            raise TestbedError(f"{e}; tgtd exit={p.poll()} log:\n{tail}") from None

    # ----- down / status -----------------------------------------------------------------------
    def down(self) -> None:
        """Stop only the daemons this run dir started (SIGTERM, then SIGKILL after 10 s).

        A libvirtd this run started may have been restarted meanwhile (the reconnect test stops
        and starts the host's libvirtd): the one the pid file names now is its replacement and
        is stopped too, so no daemon outlives the run that brought it up. The namespace hosts
        go first (hosts_down)."""
        self.hosts_down()
        st = self._state()
        started = st.get("libvirtd", {}).get("pids", [])
        if any(comm == "libvirtd" for _, comm in started):
            now = _read_pid(Path("/run/libvirtd.pid"))
            if now and [now, "libvirtd"] not in started and _pid_alive(now, "libvirtd"):
                st["libvirtd"]["pids"] = [*started, [now, "libvirtd"]]
        for service in reversed(SERVICES):
            for pid, comm in reversed(st.get(service, {}).get("pids", [])):
                if not _pid_alive(pid, comm):
                    continue
                if comm == "tgtd":  # tgtd ignores SIGTERM while it has targets; ask it to exit
                    run(["tgtadm", "-C", str(TGT_CONTROL_PORT), "--op", "delete", "--mode", "system"],
                        check=False, timeout=15)
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
                deadline = time.monotonic() + 10
                while _pid_alive(pid, comm) and time.monotonic() < deadline:
                    try:  # reap if it is our child (tgtd started in this process)
                        os.waitpid(pid, os.WNOHANG)
                    except ChildProcessError:
                        pass
                    time.sleep(0.1)
                if _pid_alive(pid, comm):
                    os.kill(pid, signal.SIGKILL)
                    try:
                        os.waitpid(pid, 0)
                    except ChildProcessError:
                        pass
            st.pop(service, None)
        self._save(st)

    def status(self) -> dict:
        st = self._state()
        mine = lambda s: [p for p, c in st.get(s, {}).get("pids", []) if _pid_alive(p, c)]  # noqa: E731
        return {
            "dir": str(self.dir),
            "libvirtd": {"answers": self._libvirt_ok(), "started_pids": mine("libvirtd")},
            "ovs": {"answers": self._ovs_ok() and self._vswitchd_ok(), "started_pids": mine("ovs")},
            "tgtd": {"answers": self._tgt_ok(), "started_pids": mine("tgtd")},
            "hosts": {n: {**h.as_dict(), "answers": h.answers(), "qemu_pids": h.qemu_pids()}
                      for n, h in self.hosts().items()},
        }

    # ----- two libvirt hosts in mount namespaces -------------------------------------------------
    def hosts(self) -> dict[str, NamespaceHost]:
        """name -> NamespaceHost for the hosts this run dir brought up (empty when none)."""
        return {n: NamespaceHost(n, rec) for n, rec in self._state().get("hosts", {}).items()}

    def _up_hosts(self) -> None:
        self.hosts_up()

    def hosts_up(self, specs: dict[str, dict] | None = None) -> dict[str, NamespaceHost]:
        """Bring up the namespace hosts (default "a" and "b", HOST_DEFAULTS; ``specs`` maps a name
        to overrides of tcp_port/migration_ports/display_ports) and wait until each answers.

        Idempotent: hosts already up and answering are kept; a half-up set is torn down first.
        """
        specs = specs or {n: {} for n in HOST_DEFAULTS}
        have = self.hosts()
        if have and set(have) == set(specs) and all(h.answers() for h in have.values()):
            return have
        if have:
            self.hosts_down()
        for c in ("unshare", "nsenter", "libvirtd", "virtlogd", "virsh"):
            if not shutil.which(c, path=os.environ.get("PATH", "") + ":" + SBIN_PATH):
                raise TestbedError(f"hosts: command {c} not installed (use --install)")
        for target in HOST_BIND_DIRS.values():
            if not Path(target).is_dir():  # never created here: it would outlive the testbed
                raise TestbedError(f"hosts: {target} does not exist (is libvirt installed?)")
        self._allow_userfaultfd()
        # Each host's libvirtd finds hugetlbfs mounts only when it starts, and its namespace
        # copies the machine's mounts when it is made: mount it first (as for the host libvirtd).
        ensure_hugetlbfs()
        taken: set[int] = set()
        caps_from = Path("/var/cache/libvirt/qemu/capabilities")
        try:
            for n, over in specs.items():
                spec = {**HOST_DEFAULTS.get(n, HOST_DEFAULTS["b"]), **over}
                host = self._up_host(n, spec, taken, caps_from if caps_from.is_dir() else None)
                taken.add(host.tcp_port)
                # the first host's probe result saves the next one the same ~12 s probe
                if not caps_from.is_dir():
                    caps_from = host.dir / "cache" / "qemu" / "capabilities"
        except BaseException:
            self.hosts_down()
            raise
        return self.hosts()

    def _save_host(self, name: str, rec: dict) -> None:
        st = self._state()
        st.setdefault("hosts", {})[name] = rec
        self._save(st)

    def _ns(self, holder: int, cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
        """Run cmd inside the mount namespace of holder."""
        return run(["nsenter", f"--target={holder}", "--mount", "--", *cmd], timeout=timeout)

    def _up_host(self, name: str, spec: dict, taken: set[int], caps_from: Path | None) -> NamespaceHost:
        hdir = self.dir / "hosts" / name
        if hdir.exists():
            shutil.rmtree(hdir)
        port = _pick_port(int(spec["tcp_port"]), taken)
        mig, disp = tuple(spec["migration_ports"]), tuple(spec["display_ports"])
        rec = {"dir": str(hdir), "tcp_port": port, "host_uuid": str(uuid.uuid4()),
               "migration_ports": list(mig), "display_ports": list(disp)}
        self._prepare_host_dirs(hdir, rec, caps_from)
        rec["cgroups"] = self._make_host_cgroups(name)
        self._save_host(name, rec)  # from here on, hosts_down() can clean up whatever follows

        # the namespace: a process that only holds it (libvirtd -d daemonizes, and the mounts are
        # made before any daemon starts); unshare execs sleep, so the Popen pid is the holder
        p = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "infinity"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        mine = _mnt_ns(os.getpid())
        _wait(f"host {name}: mount namespace",
              lambda: p.poll() is None and _mnt_ns(p.pid) not in (None, mine) and _pid_alive(p.pid, "sleep"), 10)
        rec.update(holder_pid=p.pid, mnt_ns=_mnt_ns(p.pid))
        self._save_host(name, rec)
        self._mount_host(p.pid, hdir, rec["cgroups"])

        root = Path(f"/proc/{p.pid}/root")
        self._ns(p.pid, ["virtlogd", "-d"])  # its socket and pid file land in the private /run
        _wait(f"host {name}: virtlogd", lambda: _unix_answers(str(root / "run/libvirt/virtlogd-sock")), 15)
        rec["virtlogd_pid"] = _read_pid(root / "run/virtlogd.pid")
        self._save_host(name, rec)
        self._ns(p.pid, ["libvirtd", "-d", "--listen"], timeout=60)
        rec["libvirtd_pid"] = _read_pid(root / "run/libvirtd.pid")
        self._save_host(name, rec)
        host = NamespaceHost(name, rec)
        try:
            _wait(f"host {name}: libvirtd on {host.uri}", host.answers, 120)
        except TestbedError as e:
            log = hdir / "log" / "libvirtd.log"
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise TestbedError(f"{e}; libvirtd.log tail:\n{tail}") from None
        return host

    def _prepare_host_dirs(self, hdir: Path, rec: dict, caps_from: Path | None) -> None:
        """The host's private /var/lib|cache|log/libvirt and /etc/libvirt.

        The var dirs get the host's directory skeleton with its owners and modes (QEMU's user
        owns /var/lib/libvirt/qemu) and no content; /etc/libvirt gets the config files, with
        this host's identity, TCP listener and port ranges set. A capabilities cache copied in
        saves the ~12 s QEMU probe (libvirt re-probes when it does not match the binaries)."""
        for key, target in HOST_BIND_DIRS.items():
            src, dst = Path(target), hdir / key
            dst.mkdir(parents=True)
            if key == "etc":
                for entry in src.iterdir():
                    if entry.is_file():
                        shutil.copy2(entry, dst / entry.name)
                    elif entry.is_dir() and entry.name in HOST_ETC_DIRS:
                        shutil.copytree(entry, dst / entry.name, symlinks=True)
                (dst / "qemu").mkdir()
            else:
                subs = [src, *(s for s in src.iterdir() if s.is_dir() and not s.is_symlink())]
                for s in subs:
                    d = dst if s == src else dst / s.name
                    d.mkdir(exist_ok=True)
                    st = s.stat()
                    os.chown(d, st.st_uid, st.st_gid)
                    os.chmod(d, st.st_mode & 0o7777)
        etc = hdir / "etc"
        _set_conf(etc / "libvirtd.conf", {
            "host_uuid": rec["host_uuid"], "listen_tcp": 1, "listen_tls": 0, "auth_tcp": "none",
            "listen_addr": "127.0.0.1", "tcp_port": str(rec["tcp_port"])})
        mig, disp = rec["migration_ports"], rec["display_ports"]
        _set_conf(etc / "qemu.conf", {
            "migration_port_min": mig[0], "migration_port_max": mig[1],
            "remote_display_port_min": disp[0], "remote_display_port_max": disp[1]})
        if caps_from and caps_from.is_dir():
            shutil.copytree(caps_from, hdir / "cache" / "qemu" / "capabilities", dirs_exist_ok=True)

    def _make_host_cgroups(self, name: str) -> list[str]:
        """One cgroup directory per hierarchy for this host, bind-mounted over the hierarchy's
        root inside its namespace (see _mount_host).

        Why: without systemd libvirt puts each guest in <hierarchy>/machine/qemu-<id>-<name>,
        an absolute path; two hosts sharing the machine's cgroup trees would put a migrating
        guest's source and destination QEMU in the same cgroup (ids start at 1 on both), so a
        cpuset or memory setting by B would act on A's QEMU and A's clean-up fails (EBUSY).
        """
        tag = f"cna-testbed-{hashlib.sha1(str(self.dir).encode()).hexdigest()[:8]}-{name}"
        made = []
        for m in _cgroup_mounts():
            d = Path(m) / tag
            d.mkdir(exist_ok=True)
            if (d / "cpuset.cpus").exists():  # v1 cpuset: a new group starts with no CPUs/nodes
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (d / f).write_text((Path(m) / f).read_text())
            made.append(str(d))
        return made

    def _mount_host(self, holder: int, hdir: Path, cgroups: list[str]) -> None:
        """Inside the namespace: drop what the machine had under /run (including other tools'
        /run/netns nsfs mounts, which a copy would keep alive), a fresh tmpfs on /run, the
        private var and etc dirs, and this host's cgroup directories over the hierarchies."""
        mounts = []
        for line in Path(f"/proc/{holder}/mountinfo").read_text().splitlines():
            mp = line.split()[4].replace("\\040", " ")
            if mp == "/run" or mp.startswith("/run/"):
                mounts.append(mp)
        for mp in sorted(mounts, key=len):
            run(["nsenter", f"--target={holder}", "--mount", "--", "umount", "--lazy", mp],
                timeout=30, check=False)  # a parent's lazy unmount already took its children
        self._ns(holder, ["mount", "-t", "tmpfs", "-o", "mode=0755,nosuid,nodev", "tmpfs", "/run"])
        # /var/lock is /run/lock on Debian (systemd-tmpfiles makes it at boot): libvirt takes a
        # UUCP lock file there for every console stream it opens on a guest's pty
        self._ns(holder, ["mkdir", "-m", "1777", "/run/lock"])
        for key, target in HOST_BIND_DIRS.items():
            self._ns(holder, ["mount", "--bind", str(hdir / key), target])
        for d in cgroups:
            self._ns(holder, ["mount", "--bind", d, str(Path(d).parent)])

    def hosts_down(self) -> None:
        """Stop each namespace host: its libvirtd, then every other process of its namespace
        (QEMU, virtlogd, helpers), then the holder; the namespace and its mounts go with the
        last of them. Then its cgroup directories and private dirs are removed."""
        st = self._state()
        errors = []
        for name, rec in list(st.get("hosts", {}).items()):
            ns, holder, lv = rec.get("mnt_ns"), rec.get("holder_pid"), rec.get("libvirtd_pid")
            host = NamespaceHost(name, rec) if "holder_pid" in rec else None
            if host:
                # QEMU pids first: their pid files live on the namespace's /run, gone with it
                everyone = host.pids()
                if lv and _mnt_ns(lv) == ns:
                    _terminate([lv], 15)  # first, so it does not react to its guests dying
                _terminate([p for p in everyone if p not in (lv, holder)] + sorted(host.cgroup_pids()), 10)
                if holder and _mnt_ns(holder) == ns:
                    _terminate([holder], 0)
                # the namespace and its mounts went with its last process; the cgroups empty
                # as the killed processes finish exiting
                try:
                    _wait(f"host {name}: its cgroups to empty", lambda: not host.cgroup_pids(), 15)
                except TestbedError as e:
                    errors.append(str(e))
            for d in rec.get("cgroups", []):
                _rmdir_tree(Path(d))
            if rec.get("dir"):
                shutil.rmtree(rec["dir"], ignore_errors=True)
            st["hosts"].pop(name)
            self._save(st)
        st.pop("hosts", None)
        was = st.pop("unprivileged_userfaultfd_was", None)
        if was is not None:
            try:
                USERFAULTFD_KNOB.write_text(f"{was}\n")
            except OSError as e:
                errors.append(f"restoring vm.unprivileged_userfaultfd to {was}: {e}")
        self._save(st)
        if errors:
            raise TestbedError("; ".join(errors))

    def _allow_userfaultfd(self) -> None:
        """Post-copy needs userfaultfd in the destination's QEMU, which runs unprivileged as on
        a real host (libvirt-qemu): set vm.unprivileged_userfaultfd=1 while the hosts are up, as
        an admin enables it for post-copy; hosts_down puts the previous value back."""
        try:
            was = USERFAULTFD_KNOB.read_text().strip()
        except OSError:
            return  # a kernel without the knob allows it
        if was == "1":
            return
        st = self._state()
        st.setdefault("unprivileged_userfaultfd_was", was)
        self._save(st)
        USERFAULTFD_KNOB.write_text("1\n")

    # ----- iSCSI targets -----------------------------------------------------------------------
    def _tgtadm(self, *args: str) -> str:
        return run(["tgtadm", "-C", str(TGT_CONTROL_PORT), "--lld", "iscsi", *args], timeout=30).stdout

    def iscsi_targets(self) -> dict[str, int]:
        """iqn -> tid. tgtadm has no machine-readable mode, so only the 'Target N: IQN' lines are read."""
        out = self._tgtadm("--mode", "target", "--op", "show")
        return {m.group(2): int(m.group(1)) for m in re.finditer(r"^Target (\d+): (\S+)$", out, re.M)}

    def iscsi_create_target(self, iqn: str, luns: list[Path] | list[str], chap: tuple[str, str] | None = None) -> int:
        """Create target iqn exposing each file as LUN 1..n to any initiator; return its tid.

        ``chap``: (user, secret) of an incoming CHAP account bound to the target, so only an
        initiator presenting it can log in (tgtd then refuses the others with an authentication
        failure). The account is the target's own: it is created here and deleted with the
        target. tgtadm takes the secret on its command line (it has no other way); that is the
        array's side of the test, never the agent's.

        An existing target with the same iqn is deleted first, so a test always gets the LUNs
        it asked for.
        """
        if not re.fullmatch(r"(iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:[A-Za-z0-9:._-]+)?|eui\.[0-9A-Fa-f]{16})", iqn):
            raise TestbedError(f"invalid iqn {iqn!r}")
        if chap is not None:
            user, secret = chap
            if not re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", user):
                raise TestbedError(f"invalid CHAP user {user!r}")
            if not re.fullmatch(r"[\x21-\x7e]{12,64}", secret):
                raise TestbedError("a CHAP secret must be 12-64 printable characters without spaces")
        files = [Path(p).resolve() for p in luns]
        for f in files:
            if not f.is_file():
                raise TestbedError(f"LUN backing file {f} does not exist")
        existing = self.iscsi_targets()
        if iqn in existing:
            self.iscsi_delete_target(iqn)
            existing.pop(iqn)
        tid = max(existing.values(), default=0) + 1
        self._tgtadm("--mode", "target", "--op", "new", "--tid", str(tid), "-T", iqn)
        try:
            for n, f in enumerate(files, start=1):
                self._tgtadm("--mode", "logicalunit", "--op", "new", "--tid", str(tid),
                             "--lun", str(n), "-b", str(f))
            if chap is not None:
                if chap[0] in self.iscsi_accounts():
                    self._tgtadm("--mode", "account", "--op", "delete", "--user", chap[0])
                self._tgtadm("--mode", "account", "--op", "new", "--user", chap[0], "--password", chap[1])
                self._tgtadm("--mode", "account", "--op", "bind", "--tid", str(tid), "--user", chap[0])
                self._chap_users()[iqn] = chap[0]
            self._tgtadm("--mode", "target", "--op", "bind", "--tid", str(tid), "-I", "ALL")
        except TestbedError:
            self.iscsi_delete_target(iqn)
            raise
        return tid

    def iscsi_accounts(self) -> list[str]:
        """CHAP account names tgtd knows (``--mode account --op show`` lists one per line)."""
        out = self._tgtadm("--mode", "account", "--op", "show")
        return [line.strip() for line in out.splitlines()[1:] if line.strip()]

    def _chap_users(self) -> dict[str, str]:
        """iqn -> the CHAP account this Testbed made for it (deleted with the target)."""
        if not hasattr(self, "_chap"):
            self._chap: dict[str, str] = {}
        return self._chap

    def iscsi_remove_lun(self, iqn: str, lun: int) -> None:
        """Withdraw one LUN while initiators stay logged in (an array unmapping it or taking it
        offline): their commands to it fail with LOGICAL UNIT NOT SUPPORTED."""
        self._tgtadm("--mode", "logicalunit", "--op", "delete", "--tid", str(self._tid(iqn)), "--lun", str(lun))

    def iscsi_add_lun(self, iqn: str, lun: int, backing: Path | str) -> None:
        """(Re-)map a file as LUN ``lun`` of target iqn."""
        f = Path(backing).resolve()
        if not f.is_file():
            raise TestbedError(f"LUN backing file {f} does not exist")
        self._tgtadm("--mode", "logicalunit", "--op", "new", "--tid", str(self._tid(iqn)), "--lun", str(lun), "-b", str(f))

    def _tid(self, iqn: str) -> int:
        tid = self.iscsi_targets().get(iqn)
        if tid is None:
            raise TestbedError(f"no iSCSI target {iqn}")
        return tid

    def iscsi_delete_target(self, iqn: str) -> None:
        """Delete target iqn (forcing off connected initiators) and the CHAP account made for
        it; no error if absent."""
        tid = self.iscsi_targets().get(iqn)
        if tid is not None:
            self._tgtadm("--mode", "target", "--op", "delete", "--force", "--tid", str(tid))
        user = self._chap_users().pop(iqn, None)
        if user is not None and user in self.iscsi_accounts():
            self._tgtadm("--mode", "account", "--op", "delete", "--user", user)

def iscsi_create_target(iqn: str, luns: list[Path] | list[str]) -> int:
    return Testbed().iscsi_create_target(iqn, luns)


def iscsi_delete_target(iqn: str) -> None:
    Testbed().iscsi_delete_target(iqn)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="cna-agent integration testbed daemons")
    ap.add_argument("action", choices=["up", "down", "status", "env"])
    ap.add_argument("--dir", type=Path, help="run dir (default $CNA_TESTBED_DIR or .cache/testbed)")
    ap.add_argument("--only", help="comma-separated subset of " + ",".join(SERVICES + OPTIONAL_SERVICES)
                    + " (hosts only when named)")
    ap.add_argument("--install", action="store_true", help="apt-get install missing packages first")
    a = ap.parse_args(argv)
    tb = Testbed(a.dir)
    try:
        if a.action == "up":
            tb.up(a.only.split(",") if a.only else None, install=a.install)
            for k, v in tb.env().items():
                print(f"{k}={shlex.quote(v)}")
        elif a.action == "down":
            tb.down()
        elif a.action == "status":
            print(json.dumps(tb.status(), indent=2))
        else:
            for k, v in tb.env().items():
                print(f"{k}={shlex.quote(v)}")
    except TestbedError as e:
        print(f"testbed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
