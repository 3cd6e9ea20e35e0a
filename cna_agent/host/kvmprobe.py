"""Decide whether KVM really works, by running real guest code under it.

/dev/kvm existing, opening, and libvirt's domain capabilities listing "kvm" are not enough:
on nested or paravirtualised hosts (seen on this project's test machines) a guest with no OS
runs while a Linux guest hangs or dies with "KVM internal error ... emulation failure". So the
probe boots the host's UEFI firmware (OVMF on x86_64, AAVMF on aarch64, which every host that
runs UEFI guests has) under ``-accel kvm`` and waits for its boot manager to print on the
serial port. Firmware switches to long mode, sets up paging, interrupts and timers - the same
machinery a Linux guest needs - and reaches its boot manager in well under a second on working
KVM. The verdict is cached by QEMU binary, kernel release and firmware, so the probe runs once
per host upgrade, not at every agent start.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

#: Firmware images probed, per architecture, first existing wins (Debian, openEuler/RHEL names).
FIRMWARE_CANDIDATES: dict[str, tuple[str, ...]] = {
    "x86_64": (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/edk2/ovmf/OVMF_CODE.fd",
        "/usr/share/edk2/ovmf/OVMF_CODE.cc.fd",
    ),
    "aarch64": (
        "/usr/share/AAVMF/AAVMF_CODE.fd",
        "/usr/share/edk2/aarch64/QEMU_EFI-pflash.raw",
        "/usr/share/edk2/aarch64/QEMU_EFI.fd",
    ),
}
#: Lines firmware prints once it is running normally in its boot manager.
_PROGRESS_MARKERS = (b"BdsDxe", b"UEFI Interactive Shell", b"Shell>")
_FAILURE_MARKERS = (b"KVM internal error", b"emulation failure", b"kvm run failed")


@dataclass(frozen=True)
class KvmVerdict:
    usable: bool
    reason: str
    seconds: float = 0.0
    method: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _device_usable() -> str:
    """Return "" when /dev/kvm can be opened read-write, else the reason it cannot."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return "/dev/kvm does not exist (no KVM module, or virtualisation disabled in firmware)"
    except PermissionError:
        return "/dev/kvm is not accessible to the agent (permissions)"
    except OSError as exc:
        return f"/dev/kvm cannot be opened: {exc.strerror}"
    os.close(fd)
    return ""


def find_firmware(arch: str) -> str | None:
    for path in FIRMWARE_CANDIDATES.get(arch, ()):
        if os.path.exists(path):
            return path
    return None


def _cache_key(emulator: str, firmware: str) -> str:
    st = os.stat(emulator)
    return f"{emulator}:{st.st_size}:{int(st.st_mtime)}|{platform.release()}|{firmware}"


def probe_kvm(
    emulator: str,
    arch: str | None = None,
    *,
    timeout: float = 10.0,
    cache_file: str | os.PathLike[str] | None = None,
) -> KvmVerdict:
    """Boot UEFI firmware under KVM and report whether it got as far as its boot manager."""
    arch = arch or platform.machine()
    reason = _device_usable()
    if reason:
        return KvmVerdict(False, reason, method="device")
    if not emulator or not os.path.exists(emulator):
        return KvmVerdict(False, f"QEMU emulator {emulator or '(none)'} not found", method="emulator")
    firmware = find_firmware(arch)
    if firmware is None:
        # Without firmware there is no real workload to run; trust the device node but say so.
        return KvmVerdict(True, "no UEFI firmware installed to test-boot; assumed usable from /dev/kvm", method="device")
    key = _cache_key(emulator, firmware)
    if cache_file is not None:
        try:
            cached = json.loads(Path(cache_file).read_text())
            if cached.get("key") == key:
                return KvmVerdict(**cached["verdict"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    verdict = _boot_firmware(emulator, arch, firmware, timeout)
    if cache_file is not None:
        try:
            Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
            Path(cache_file).write_text(json.dumps({"key": key, "verdict": verdict.to_dict()}))
        except OSError:
            pass
    return verdict


def _boot_firmware(emulator: str, arch: str, firmware: str, timeout: float) -> KvmVerdict:
    with tempfile.TemporaryDirectory(prefix="cna-kvmprobe-") as tmp:
        serial = Path(tmp) / "serial.log"
        args = [emulator, "-accel", "kvm", "-m", "256", "-nodefaults", "-display", "none", "-no-user-config",
                "-serial", f"file:{serial}", "-net", "none"]
        if arch == "aarch64":
            args += ["-machine", "virt,gic-version=host", "-cpu", "host"]
        else:
            args += ["-machine", "q35"]
        args += ["-drive", f"if=pflash,format=raw,readonly=on,file={firmware}"]
        errlog = Path(tmp) / "stderr.log"
        started = time.monotonic()
        # stderr goes to a file so it can be watched while QEMU runs: on a KVM internal
        # error QEMU pauses the guest instead of exiting.
        with errlog.open("wb") as errfh:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errfh)
        err = b""
        try:
            while time.monotonic() - started < timeout:
                time.sleep(0.1)
                out = serial.read_bytes() if serial.exists() else b""
                if any(m in out for m in _PROGRESS_MARKERS):
                    return KvmVerdict(True, "UEFI firmware booted under KVM", time.monotonic() - started, "firmware-boot")
                err = errlog.read_bytes()
                if any(m in err for m in _FAILURE_MARKERS) or proc.poll() is not None:
                    break
        finally:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            err = errlog.read_bytes()
        elapsed = time.monotonic() - started
        for marker in _FAILURE_MARKERS:
            if marker in err:
                line = next((ln for ln in err.decode(errors="replace").splitlines() if marker.decode() in ln), marker.decode())
                return KvmVerdict(False, f"QEMU under KVM failed: {line.strip()}", elapsed, "firmware-boot")
        if proc.returncode not in (None, 0, -9):
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            return KvmVerdict(False, f"QEMU under KVM exited with {proc.returncode}: {tail[0]}", elapsed, "firmware-boot")
        return KvmVerdict(False, f"UEFI firmware did not reach its boot manager under KVM within {timeout:.0f}s", elapsed, "firmware-boot")
