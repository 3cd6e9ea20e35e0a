"""QEMU's firmware descriptors as the agent reads them (the files libvirt chooses a UEFI build
from), and CreateVm's refusal of Secure Boot on a host that has no enrolled-keys build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cna_agent.firmware_descriptors import DESCRIPTOR_DIRS, secure_boot_arches, uefi_builds
from cna_agent.compute.spec import BootSpec, DiskSpec, VmSpec
from cna_agent.compute.spec_validation import ValidationContext, validate
from cna_agent.errors import InvalidArgument


def _descriptor(d: Path, name: str, arch: str, code: Path, features: list[str], kind: str = "uefi") -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(json.dumps({
        "interface-types": [kind], "features": features,
        "mapping": {"device": "flash", "executable": {"filename": str(code), "format": "raw"},
                    "nvram-template": {"filename": str(code) + ".vars", "format": "raw"}},
        "targets": [{"architecture": arch, "machines": ["pc-q35-*" if arch == "x86_64" else "virt-*"]}]}))


def test_enrolled_secure_boot_builds_are_found_per_arch_with_the_etc_override_and_missing_images_ignored(tmp_path: Path) -> None:
    etc, usr = tmp_path / "etc", tmp_path / "usr"
    code = tmp_path / "OVMF_CODE.ms.fd"
    code.write_bytes(b"\0")
    _descriptor(usr, "40-x86-enrolled.json", "x86_64", code, ["secure-boot", "enrolled-keys", "requires-smm"])
    _descriptor(usr, "40-arm-enrolled.json", "aarch64", tmp_path / "missing.fd", ["secure-boot", "enrolled-keys"])
    _descriptor(usr, "60-x86.json", "x86_64", code, [])
    _descriptor(usr, "70-bios.json", "x86_64", code, [], kind="bios")
    (usr / "80-broken.json").write_text("{not json")
    dirs = (str(etc), str(usr))
    builds = {Path(b.path).name: b for b in uefi_builds(dirs)}
    assert sorted(builds) == ["40-x86-enrolled.json", "60-x86.json"]  # no image, BIOS and broken left out
    assert builds["40-x86-enrolled.json"].secure_boot_enrolled and not builds["60-x86.json"].secure_boot_enrolled
    assert secure_boot_arches(dirs) == {"x86_64"}
    # an admin's file of the same name in /etc hides the packaged one (QEMU's override rule)
    _descriptor(etc, "40-x86-enrolled.json", "x86_64", code, ["secure-boot"])
    assert secure_boot_arches(dirs) == frozenset()
    assert DESCRIPTOR_DIRS[0] == "/etc/qemu/firmware"


def test_secure_boot_is_refused_naming_the_field_when_the_host_has_no_enrolled_build_for_the_arch() -> None:
    spec = VmSpec(name="sb", vcpus=1, memory_mib=256, firmware="uefi", secure_boot=True, arch="x86_64",
                  disks=[DiskSpec(volume="ds/root.qcow2", boot_order=1)], boot=BootSpec())
    validate(spec, ValidationContext(secure_boot_arches=frozenset({"x86_64"})))
    validate(spec, ValidationContext())  # not known: libvirt decides
    with pytest.raises(InvalidArgument, match="ovmf") as err:
        validate(spec, ValidationContext(secure_boot_arches=frozenset({"aarch64"})))
    assert err.value.field == "spec.secure_boot"
