"""The distribution packages are built, inspected from outside and their entry points run.

A .deb and an RPM are only worth shipping if what they install is what the systemd unit,
tmpfiles and config expect: the unit and scripts in the right places, the config 0600 in a
0700 directory and kept across upgrades, dependencies on the distribution's python3-libvirt
(never a venv), and an installed tree that imports with the distribution's python3 packages.
Both are built by ``tools/build-packages.sh OUTDIR`` (what the README tells an admin to run), on
a copy of the tree (never in the checkout) with the system's PATH, so no venv or pyenv
interpreter leaks into the package. One build of each, checked at once.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cna_agent import __version__

REPO = Path(__file__).resolve().parents[2]
SYSTEM_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}
RUNTIME_DEPS = ("python3-libvirt", "python3-grpcio", "python3-protobuf", "python3-psutil", "python3-pyroute2",
                "dosfstools", "mtools")  # mkfs.vfat and mcopy make the first-boot customization drive

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**SYSTEM_ENV, **(env or {})})
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t, path=SYSTEM_ENV["PATH"]) is None]
    if missing:
        pytest.skip(f"packaging tools missing (tools/setup.sh installs them): {missing}")


def _build(out: Path, which: str) -> None:
    _run(["bash", str(REPO / "tools" / "build-packages.sh"), str(out)], timeout=1200, env={"CNA_PACKAGES": which})


def test_debian_package(tmp_path):
    _need("dpkg-buildpackage", "dh", "lintian", "argparse-manpage", "protoc", "grpc_python_plugin")
    _build(tmp_path, "deb")
    (deb,) = tmp_path.glob(f"cna-agent_{__version__}_*.deb")

    # Files and modes, as dpkg-deb lists them: "drwx------ root/root 0 date time ./etc/cna-agent/".
    listing = {}
    for line in _run(["dpkg-deb", "-c", str(deb)]).splitlines():
        mode, owner, *_rest, path = line.split()
        listing[path.removeprefix(".").rstrip("/") or "/"] = (mode, owner)
    for path in ("/usr/bin/cna-agent", "/usr/bin/cna-ctl", "/lib/systemd/system/cna-agent.service",
                 "/usr/lib/tmpfiles.d/cna-agent.conf", "/etc/default/cna-agent",
                 "/usr/share/man/man1/cna-agent.1.gz", "/usr/share/man/man1/cna-ctl.1.gz",
                 "/usr/share/bash-completion/completions/cna-ctl",
                 "/usr/lib/python3/dist-packages/cna_agent/api/pb.py"):
        assert path in listing, f"{path} missing from the .deb"
    assert listing["/etc/cna-agent"] == ("drwx------", "root/root")
    assert listing["/etc/cna-agent/agent.toml"] == ("-rw-------", "root/root")
    assert listing["/usr/bin/cna-ctl"][0] == "-rwxr-xr-x"
    assert any(re.fullmatch(r"/usr/lib/python3/dist-packages/cna_agent/_native\..*so", p) for p in listing)
    assert not any("venv" in p or "/usr/local" in p for p in listing)

    # Control data: Depends on the distribution's packages; conffiles; dh_installsystemd scripts.
    fields = _run(["dpkg-deb", "-f", str(deb), "Depends"])
    depends = {d.strip().split()[0] for d in fields.replace("|", ",").split(",") if d.strip()}
    for dep in RUNTIME_DEPS:
        assert dep in depends, f"Depends lacks {dep}: {fields}"
    assert "venv" not in fields
    ctrl = tmp_path / "ctrl"
    _run(["dpkg-deb", "-e", str(deb), str(ctrl)])
    assert set((ctrl / "conffiles").read_text().split()) == {"/etc/cna-agent/agent.toml", "/etc/default/cna-agent"}
    postinst, prerm, postrm = ((ctrl / n).read_text() for n in ("postinst", "prerm", "postrm"))
    assert "deb-systemd-helper enable 'cna-agent.service'" in postinst
    assert "systemd-tmpfiles" in postinst and "cna-agent.conf" in postinst
    assert "deb-systemd-invoke stop 'cna-agent.service'" in prerm
    assert "deb-systemd-helper purge 'cna-agent.service'" in postrm

    # The unit shipped is systemd/'s, byte for byte (no second copy drifting).
    root = tmp_path / "root"
    _run(["dpkg-deb", "-x", str(deb), str(root)])
    assert (root / "lib/systemd/system/cna-agent.service").read_bytes() == (REPO / "systemd/cna-agent.service").read_bytes()
    man = _run(["zcat", str(root / "usr/share/man/man1/cna-ctl.1.gz")])
    assert "cna-ctl \\- debug CLI" in man and "vm" in man
    completion = (root / "usr/share/bash-completion/completions/cna-ctl").read_text()
    assert "complete -F _cna_ctl cna-ctl" in completion and '"vm snapshot")' in completion

    # The entry points with the distribution's python3 and packages, the extracted tree on the path.
    env = {"PYTHONPATH": str(root / "usr/lib/python3/dist-packages")}
    assert _run([str(root / "usr/bin/cna-agent"), "--version"], env=env, cwd=tmp_path).strip() == f"cna-agent {__version__}"
    help_text = _run([str(root / "usr/bin/cna-ctl"), "--help"], env=env, cwd=tmp_path)
    assert "usage: cna-ctl" in help_text and "GROUP" in help_text
    assert (root / "usr/bin/cna-ctl").read_text().startswith("#!/usr/bin/python3")

    # lintian: no error-level tag; warnings only with a justified override
    # (packaging/debian/cna-agent.lintian-overrides).
    (changes,) = tmp_path.glob(f"cna-agent_{__version__}_*.changes")
    lint = subprocess.run(["lintian", "--fail-on", "error,warning", str(changes)], capture_output=True,
                          text=True, timeout=600, env=SYSTEM_ENV)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert not re.search(r"^[EW]: ", lint.stdout, re.MULTILINE), lint.stdout


def test_rpm_package(tmp_path):
    _need("rpmbuild", "rpm", "argparse-manpage", "protoc", "grpc_python_plugin")
    # The script builds with --nodeps: BuildRequires name openEuler packages, which this Debian
    # host's rpm database (empty) cannot know; the Debian equivalents are installed by tools/setup.sh.
    _build(tmp_path, "rpm")
    (rpm,) = tmp_path.glob(f"cna-agent-{__version__}-*.rpm")

    files = set(_run(["rpm", "-qlp", str(rpm)]).split())
    for path in ("/usr/bin/cna-agent", "/usr/bin/cna-ctl", "/usr/lib/systemd/system/cna-agent.service",
                 "/usr/lib/tmpfiles.d/cna-agent.conf", "/etc/sysconfig/cna-agent", "/etc/cna-agent/agent.toml",
                 "/usr/share/man/man1/cna-ctl.1", "/usr/share/bash-completion/completions/cna-ctl",
                 "/var/lib/cna-agent"):
        assert any(f == path or f.startswith(path + ".") for f in files), f"{path} missing from the RPM"
    assert any(f.endswith("/cna_agent/api/pb.py") for f in files)
    assert not any("venv" in f or f.startswith("/usr/local") for f in files)

    # Modes from the header: "path size mtime digest mode owner group ...".
    modes = {}
    for line in _run(["rpm", "-qp", "--dump", str(rpm)]).splitlines():
        parts = line.split()
        modes[parts[0]] = parts[4]
    assert modes["/etc/cna-agent"] == "040700"
    assert modes["/etc/cna-agent/agent.toml"] == "0100600"

    configs = set(_run(["rpm", "-qp", "--configfiles", str(rpm)]).split())
    assert configs == {"/etc/cna-agent/agent.toml", "/etc/sysconfig/cna-agent"}
    # %config(noreplace): the file flags carry both "config" and "noreplace".
    flags = _run(["rpm", "-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]", str(rpm)])
    assert re.search(r"^/etc/cna-agent/agent.toml cn", flags, re.MULTILINE), flags

    scripts = _run(["rpm", "-qp", "--scripts", str(rpm)])
    post = scripts.split("postinstall scriptlet")[1].split("preuninstall scriptlet")[0]
    preun = scripts.split("preuninstall scriptlet")[1].split("postuninstall scriptlet")[0]
    postun = scripts.split("postuninstall scriptlet")[1]
    assert "systemctl" in post and "preset" in post and "cna-agent.service" in post
    assert "systemd-tmpfiles" in post and "--create" in post
    assert "disable" in preun and "cna-agent.service" in preun
    assert "try-restart" in postun and "cna-agent.service" in postun

    requires = set(_run(["rpm", "-qp", "--requires", str(rpm)]).split("\n"))
    for dep in RUNTIME_DEPS:
        assert dep in requires, f"Requires lacks {dep}"
    assert not any("dist(" in r for r in requires), "PyPI floors leaked into Requires"

    if shutil.which("rpmlint", path=SYSTEM_ENV["PATH"]):
        lint = subprocess.run(["rpmlint", str(rpm)], capture_output=True, text=True, timeout=300, env=SYSTEM_ENV)
        assert " 0 errors" in lint.stdout or "E: " not in lint.stdout, lint.stdout[-3000:]
