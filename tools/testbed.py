#!/usr/bin/env python3
"""Bring up / tear down the real daemons integration tests need (no systemd required).

Why: integration tests run against real libvirtd, Open vSwitch and tgtd (DESIGN.md, "What runs
where in tests"), on CI machines and containers where systemd is not PID 1 and the OVS kernel
module is absent. This script starts what is missing, in a private run directory, waits until each
daemon answers, and later stops only what it started.

CLI::

    tools/testbed.py up     [--dir D] [--only libvirtd,ovs,tgtd] [--install]
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

Module-level ``iscsi_create_target`` / ``iscsi_delete_target`` use ``Testbed()`` (default dir).
Errors are ``TestbedError`` carrying the failing command and its stderr.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVICES = ("libvirtd", "ovs", "tgtd")
LIBVIRT_URI = "qemu:///system"
ISCSI_PORTAL = "127.0.0.1:3260"
TGT_CONTROL_PORT = 4260  # private tgtd management socket: /var/run/tgtd/socket.<port>

PACKAGES = {
    "libvirtd": ["libvirt-daemon-system", "libvirt-daemon-driver-qemu", "libvirt-clients",
                 "qemu-system-x86", "qemu-system-arm", "qemu-efi-aarch64", "qemu-utils",
                 "qemu-block-extra"],
    "ovs": ["openvswitch-switch", "nftables", "ethtool"],
    "tgtd": ["tgt", "libiscsi-bin"],
}
COMMANDS = {
    "libvirtd": ["libvirtd", "virtlogd", "virsh"],
    "ovs": ["ovsdb-server", "ovs-vswitchd", "ovsdb-tool", "ovs-vsctl", "ovs-appctl"],
    "tgtd": ["tgtd", "tgtadm"],
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
        bad = [s for s in services if s not in SERVICES]
        if bad:
            raise TestbedError(f"unknown service(s) {bad}; choose from {list(SERVICES)}")
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
        is stopped too, so no daemon outlives the run that brought it up."""
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
        }

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
    ap.add_argument("--only", help="comma-separated subset of " + ",".join(SERVICES))
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
