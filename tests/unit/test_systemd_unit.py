"""The systemd integration files: checked by systemd's own tools, and their key choices pinned.

`systemd-analyze verify` and `systemd-tmpfiles --create --root=` parse with the real systemd
code, so a misspelt key or a bad mode fails here rather than on a hypervisor at boot. Neither
needs systemd as PID 1. The pinned choices are the ones DESIGN.md depends on (guests survive an
agent restart, the watchdog restarts a wedged agent, the QMP socket directory survives restarts).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "cna-agent.service"
TMPFILES = ROOT / "systemd" / "cna-agent.tmpfiles"
SYSCONFIG = ROOT / "systemd" / "cna-agent.sysconfig"
TIMEOUT = 120


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as {section: [(key, value), ...]}, keeping repeated keys in order.

    configparser cannot do this: units repeat keys (After=, Environment=) and an empty
    assignment resets a list, so order and repetition matter.
    """
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def single(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= expected once, found {found}"
    return found[0]


def words(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> set[str]:
    return {w for v in values(unit, section, key) for w in v.split()}


@pytest.fixture(scope="module")
def unit() -> dict[str, list[tuple[str, str]]]:
    return parse_unit(UNIT.read_text())


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|min)?", value)
    assert m, f"unexpected time span {value!r}"
    return int(m.group(1)) * {"ms": 0.001, "s": 1, None: 1, "min": 60}[m.group(2)]


# ---- systemd-analyze verify -------------------------------------------------------------


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed")
    return exe


def _verify(unit_file: Path) -> subprocess.CompletedProcess[str]:
    exe = _analyze()
    help_text = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=TIMEOUT).stdout
    args = [exe, "verify"]
    # --man=no: do not require man pages for Documentation=; --recursive-errors=no: judge only
    # this unit, not whatever unit files the host has installed (both exist since systemd 250).
    for flag in ("--man=no", "--recursive-errors=no"):
        if flag.split("=")[0] in help_text:
            args.append(flag)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSTEMD_")}
    return subprocess.run(
        [*args, str(unit_file)], capture_output=True, text=True, timeout=TIMEOUT, env=env, check=False
    )


def _verifiable_copy(tmp_path: Path, text: str) -> Path:
    """The unit with ExecStart= pointing at a binary that exists here.

    verify checks that ExecStart's executable exists; /usr/bin/cna-agent is only there on an
    installed host, so the interpreter running these tests stands in for it.
    """
    new, n = re.subn(r"(?m)^ExecStart=/usr/bin/cna-agent ", f"ExecStart={sys.executable} ", text)
    assert n == 1
    path = tmp_path / "cna-agent.service"
    path.write_text(new)
    return path


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    result = _verify(_verifiable_copy(tmp_path, UNIT.read_text()))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    problems = [
        line
        for line in output.splitlines()
        if "cna-agent" in line or re.search(r"unknown (key|section)|ignoring|invalid|failed to parse", line, re.I)
    ]
    assert problems == [], output


def test_systemd_analyze_verify_catches_unknown_keys(tmp_path: Path) -> None:
    """Negative control: proves the check above really reads our file and reports typos."""
    text = UNIT.read_text().replace("KillMode=process", "KillMode=process\nKilMode=process", 1)
    result = _verify(_verifiable_copy(tmp_path, text))
    assert "Unknown key 'KilMode'" in result.stderr, result.stderr


# ---- pinned choices -----------------------------------------------------------------------


def test_notify_and_watchdog(unit: dict[str, list[tuple[str, str]]]) -> None:
    assert single(unit, "Service", "Type") == "notify"
    assert single(unit, "Service", "NotifyAccess") == "main"
    watchdog = _seconds(single(unit, "Service", "WatchdogSec"))
    assert 10 <= watchdog <= 120
    assert single(unit, "Service", "Restart") == "on-failure"
    assert _seconds(single(unit, "Service", "RestartSec")) > 0
    # A configuration error (cna_agent.daemon.EXIT_CONFIG) fails the unit instead of looping.
    from cna_agent.daemon import EXIT_CONFIG, EXIT_STARTUP
    assert single(unit, "Service", "RestartPreventExitStatus") == str(EXIT_CONFIG) != str(EXIT_STARTUP)
    assert _seconds(single(unit, "Service", "TimeoutStopSec")) > 0


def test_guests_survive_agent_restart(unit: dict[str, list[tuple[str, str]]]) -> None:
    assert single(unit, "Service", "KillMode") == "process"
    assert words(unit, "Service", "RuntimeDirectory") == {"cna-agent", "cna-qmp"}
    # The QMP side-channel sockets of running guests live there: never deleted on stop.
    assert single(unit, "Service", "RuntimeDirectoryPreserve") == "yes"
    # Traversable, not listable: unprivileged QEMU (libvirtd) reaches its own socket directory.
    assert single(unit, "Service", "RuntimeDirectoryMode") == "0711"
    assert single(unit, "Service", "StateDirectory") == "cna-agent"


def test_exec_start_and_environment(unit: dict[str, list[tuple[str, str]]]) -> None:
    assert single(unit, "Service", "ExecStart").startswith(
        "/usr/bin/cna-agent serve --config /etc/cna-agent/agent.toml"
    )
    assert values(unit, "Service", "EnvironmentFile") == ["-/etc/sysconfig/cna-agent", "-/etc/default/cna-agent"]
    # SIGHUP would kill an agent without a handler and count as a clean exit (no restart).
    assert values(unit, "Service", "ExecReload") == []


def test_dependencies_are_soft(unit: dict[str, list[tuple[str, str]]]) -> None:
    assert values(unit, "Unit", "Requires") == [] and values(unit, "Unit", "BindsTo") == []
    after = words(unit, "Unit", "After")
    for dep in ("libvirtd.service", "virtqemud.socket", "openvswitch-switch.service", "iscsid.service",
                "network-online.target"):
        assert dep in after
    wants = words(unit, "Unit", "Wants")
    assert "network-online.target" in wants
    # Pulling either libvirt flavour stops the other (the modular units conflict with libvirtd).
    assert not wants & {"libvirtd.service", "libvirtd.socket", "virtqemud.service", "virtqemud.socket"}


def test_limits_fit_a_thousand_guests(unit: dict[str, list[tuple[str, str]]]) -> None:
    assert int(single(unit, "Service", "LimitNOFILE")) >= 8192
    assert int(single(unit, "Service", "TasksMax")) >= 8000


def test_no_hardening_that_breaks_vm_management(unit: dict[str, list[tuple[str, str]]]) -> None:
    keys = {k for k, _ in unit["Service"]}
    # Mount namespaces hide the agent's mounts from the host; device allowlists block /dev/kvm,
    # taps and hot-plugged LUNs; NoNewPrivileges blocks sVirt transitions; W^X breaks TCG.
    forbidden = {
        "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectClock", "DeviceAllow",
        "DevicePolicy", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
        "ProtectControlGroups", "NoNewPrivileges", "MemoryDenyWriteExecute", "RestrictNamespaces",
        "PrivateNetwork", "ReadOnlyPaths", "InaccessiblePaths", "User", "DynamicUser",
    }
    assert keys & forbidden == set()
    bounding = words(unit, "Service", "CapabilityBoundingSet")
    assert bounding and all(w.lstrip("~") not in {"CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_SYS_NICE"} for w in bounding)
    assert single(unit, "Service", "SystemCallErrorNumber") == "EPERM"


# ---- tmpfiles.d ---------------------------------------------------------------------------

EXPECTED_DIRS = {
    "/run/cna-agent": "0711",
    "/run/cna-qmp": "0711",
    "/var/lib/cna-agent": "0700",
    "/etc/cna-agent": "0700",
    "/etc/cna-agent/agent.toml.d": "0700",
}


def test_tmpfiles_syntax() -> None:
    """A syntax check that needs no systemd: type, absolute path, octal mode, owner, age."""
    seen: dict[str, str] = {}
    for line in TMPFILES.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split()
        assert 6 <= len(fields) <= 7, line
        typ, path, mode, user, group, age = fields[:6]
        assert typ == "d", line
        assert path.startswith("/") and ".." not in path.split("/"), line
        assert re.fullmatch(r"0[0-7]{3}", mode), line
        assert (user, group, age) == ("root", "root", "-"), line
        seen[path] = mode
    assert seen == EXPECTED_DIRS


def test_systemd_tmpfiles_creates_the_tree(tmp_path: Path) -> None:
    exe = shutil.which("systemd-tmpfiles")
    if exe is None:
        pytest.skip("systemd-tmpfiles not installed")
    if os.geteuid() != 0:
        pytest.skip("entries are owned by root; chown needs root")
    # This systemd (252) has no --dry-run; creating under an alternate root is the real thing.
    result = subprocess.run(
        [exe, "--create", f"--root={tmp_path}", str(TMPFILES)],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    for path, mode in EXPECTED_DIRS.items():
        st = (tmp_path / path.lstrip("/")).stat()
        assert stat.S_ISDIR(st.st_mode)
        assert oct(stat.S_IMODE(st.st_mode)) == oct(int(mode, 8)), path
        assert st.st_uid == 0 and st.st_gid == 0


# ---- sample environment file --------------------------------------------------------------


def test_sysconfig_examples_are_valid_config_overrides() -> None:
    """Every commented CNA_AGENT_<SECTION>_<KEY> example is accepted by the config loader."""
    config = pytest.importorskip("cna_agent.config")
    env: dict[str, str] = {}
    for line in SYSCONFIG.read_text().splitlines():
        m = re.fullmatch(r"#?([A-Z_][A-Z0-9_]*)=(.*)", line.strip())
        if m:
            env[m.group(1)] = m.group(2)
    assert "CNA_AGENT_OPTS" in env
    assert any(k.startswith("CNA_AGENT_") and k != "CNA_AGENT_OPTS" for k in env)
    # CNA_AGENT_OPTS shares the prefix but names no config section: it must be ignored.
    config.load_config(Path("/nonexistent/cna-agent/agent.toml"), environ=env, require_file=False)
