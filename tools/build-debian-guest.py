#!/usr/bin/env python3
"""Build (and cache) a real Debian 12 guest: systemd, qemu-guest-agent and cloud-init.

Why: the busybox test guest (build-test-guest.py) boots in seconds but has no init system, no
guest agent and no first-boot customization, so nothing a real OS does (systemd's ACPI shutdown,
qemu-guest-agent's guest info and fsfreeze, cloud-init's NoCloud seed) can be observed with it.
This image is what those tests boot; the busybox guest stays for the fast tests.

How, without loop devices or mounts of the image: ``mmdebstrap`` installs the packages into a
directory with the host's own apt sources (so the same registry is used), the few files that make
it a test guest are written into that directory from Python, and ``mkfs.ext4 -d`` turns the
directory into the root filesystem (label ``cna-root``), written at its partition's offset in a
GPT disk image whose first partition is an EFI System Partition (FAT, made with ``mkfs.vfat
--offset`` and filled with ``mcopy``); the raw disk is converted to qcow2. The disk boots two ways:

* direct kernel boot: the distribution's cloud kernel and initramfs are copied out of the tree
  (``root=LABEL=cna-root``), the fast path most tests use;
* from the disk through UEFI, with Secure Boot: the ESP holds Debian's signed shim as the
  removable-media loader (``/EFI/BOOT/BOOTX64.EFI``), Debian's signed GRUB next to it and a
  ``grub.cfg`` that loads the (signed) cloud kernel from the root partition. OVMF with
  Microsoft's keys enrolled trusts shim (signed by Microsoft's UEFI CA), shim trusts GRUB and the
  kernel (signed by Debian), so the chain is the one a real Debian host boots. No fallback loader
  (``fbx64.efi``) is installed: the firmware's boot entries are never rewritten by the guest.
  The ``grub.cfg`` adds ``cloud-init=disabled`` unless a drive labelled ``CIDATA``/``cidata``
  (a NoCloud seed) is attached, as the direct-boot manifest's ``cmdline_without_seed`` does.

Usage::

    tools/build-debian-guest.py [--arch x86_64] [--out DIR] [--refresh] [--print-json]
    tools/build-debian-guest.py --node-deb dist/cna-agent_VERSION_amd64.deb [...]

``--node-deb`` builds the *node* flavour instead (``debian-node-<arch>/``): the same guest with
the agent's .deb installed by apt, with the distribution packages it depends on, and QEMU, so
that a test can run the agent under the guest's real systemd (PID 1, journald, the watchdog)
with a nested TCG guest of its own. dpkg runs the package's maintainer scripts in the tree, so
the unit is enabled exactly as on an installed host and starts at boot.

Output (default ``<repo>/.cache/guests/debian-<arch>/``, or ``$CNA_GUEST_CACHE/debian-<arch>/``):
``disk.qcow2``, ``vmlinuz``, ``initrd.img``, ``manifest.json`` (``efi_loader``, ``esp_label`` and
``secure_boot_chain`` say what the ESP holds). Cached by content: rebuilt only
when a file is missing or the recipe changed (this script, the package list, the host's apt
sources, the arch); ``--refresh`` rebuilds anyway (newer package versions in the mirror).

What the guest does (the test protocol; console ttyS0):

* Boots systemd to multi-user; ``cna-guest-marker.service`` then prints
  ``CNA-GUEST-READY boot=<n> os=debian`` on the console (``n`` counts boots, kept on the disk),
  and ``CNA-GUEST-SYSTEMD-STOP`` when systemd stops it on the way down (shutdown or reboot through
  systemd, not a power cut).
* A ``login:`` prompt on ttyS0; user ``root``, password ``ROOT_PASSWORD`` below (a test image:
  the password is published here on purpose). root's shell prompt is ``cna# `` so the tests'
  console helpers (tests/support/console.py) run commands as on the busybox guest.
* qemu-guest-agent is started by udev when the ``org.qemu.guest_agent.0`` virtio port appears.
* cloud-init looks only for a NoCloud seed (a drive labelled ``cidata``). Debian's cloud-init
  still runs its stages when it finds none (15 s of a 29 s boot under TCG), so a boot without a
  seed adds ``cloud-init=disabled`` to the command line (the manifest's ``cmdline_without_seed``):
  ready in 14 s.
* No network configuration of its own: a NIC is configured by a NoCloud seed or by hand.
* Hot-added vCPUs and memory are brought online by a udev rule, as cloud images do.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

_TOOLS_DIR = str(Path(__file__).resolve().parent)
if _TOOLS_DIR not in sys.path:
    sys.path.insert(0, _TOOLS_DIR)

import guest_build_util  # noqa: E402
from guest_build_util import fat_disk, run, sha256_file  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}
CONSOLES = {"x86_64": "ttyS0", "aarch64": "ttyAMA0"}
KERNEL_PACKAGES = {"x86_64": "linux-image-cloud-amd64", "aarch64": "linux-image-cloud-arm64"}
#: The signed boot chain from Debian's packages (shim signed by Microsoft, GRUB and the kernel by
#: Debian) and mokutil, which reads the Secure Boot state inside the guest.
BOOT_PACKAGES = {"x86_64": ["shim-signed", "grub-efi-amd64-signed", "mokutil"],
                 "aarch64": ["shim-signed", "grub-efi-arm64-signed", "mokutil"]}
#: Where those packages put the signed binaries, and their names on the ESP (shim looks for
#: GRUB, and for MokManager, in its own directory).
EFI_FILES = {
    "x86_64": {"BOOTX64.EFI": "usr/lib/shim/shimx64.efi.signed", "mmx64.efi": "usr/lib/shim/mmx64.efi.signed",
               "grubx64.efi": "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"},
    "aarch64": {"BOOTAA64.EFI": "usr/lib/shim/shimaa64.efi.signed", "mmaa64.efi": "usr/lib/shim/mmaa64.efi.signed",
                "grubaa64.efi": "usr/lib/grub/arm64-efi-signed/grubaa64.efi.signed"},
}
SUITE = "bookworm"
#: The packages on top of mmdebstrap's minbase variant (Depends only, no Recommends).
PACKAGES = [
    "systemd-sysv", "udev", "dbus", "qemu-guest-agent", "cloud-init", "ifupdown", "isc-dhcp-client",
    "iproute2", "e2fsprogs", "util-linux", "procps", "kmod",
    "tpm2-tools",  # the vTPM checks: NV indexes written on one boot, read on the next
]
#: The node flavour's additions: the agent's Recommends that its test needs (QEMU for a guest
#: under the embedded driver; the Depends come with the .deb itself).
NODE_PACKAGES = {"x86_64": ["qemu-system-x86"], "aarch64": ["qemu-system-arm"]}
ROOT_PASSWORD = "cna-guest"
#: Fixed salt: the same recipe gives the same /etc/shadow (and the same cache key) every time.
_PASSWORD_SALT = "cnaguestsalt0001"
HOSTNAME = "cna-debian"
LABEL = "cna-root"
MARKER = "CNA-GUEST-READY"
ESP_LABEL = "CNA-ESP"
#: The GPT layout, in 512-byte sectors: a 64 MiB ESP at 1 MiB, the 3 GiB root partition after it,
#: and 1 MiB at the end for the backup GPT.
ESP_START, ESP_SECTORS = 2048, 64 * 2048
ROOT_START, ROOT_SECTORS = 2048 + 64 * 2048, 3 * 1024 * 2048
DISK_SECTORS = ROOT_START + ROOT_SECTORS + 2048
HOST_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
#: Documentation, man pages and translations are left out of the image (dpkg path excludes): a
#: smaller tree makes mkfs and every copy of the image faster, and no test reads them.
_DPKG_EXCLUDES = ["/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*",
                  "/usr/share/lintian/*"]
_DPKG_KEEP = ["/usr/share/doc/*/copyright"]
#: Units that only cost boot time on a test guest (timers that start apt, fs checks).
_MASKED_UNITS = ["apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_reap.service", "e2scrub_all.timer",
                 "fstrim.timer", "man-db.timer", "systemd-timesyncd.service"]

MARKER_SCRIPT = r"""#!/bin/sh
# cna-agent Debian test guest: boot marker (tools/build-debian-guest.py; protocol in its docstring)
con=/dev/console
case "$1" in
  start)
    n=$(cat /var/lib/cna-guest/boot-count 2>/dev/null || echo 0)
    n=$((n + 1))
    mkdir -p /var/lib/cna-guest && echo "$n" > /var/lib/cna-guest/boot-count && sync
    printf '\n@MARKER@ boot=%s os=debian\n' "$n" > $con ;;
  stop)
    printf '\nCNA-GUEST-SYSTEMD-STOP\n' > $con ;;
esac
"""

MARKER_UNIT = """[Unit]
Description=cna-agent test guest boot marker
After=multi-user.target qemu-guest-agent.service cloud-final.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/cna-guest-marker start
ExecStop=/usr/local/sbin/cna-guest-marker stop

[Install]
WantedBy=multi-user.target
"""

CLOUD_CFG = """# cna-agent test guest: look only for a NoCloud seed (a drive labelled cidata). Without one,
# cloud-init finds nothing to do (boots without a seed also disable it on the command line).
datasource_list: [ NoCloud ]
# minbase has no locales package, so cc_locale's update-locale fails (exit 255) and cloud-init
# reports the first boot as an error: leave the locale as the image has it.
locale: false
"""


HOTPLUG_RULES = """# cna-agent test guest: online hot-added CPUs and memory blocks
SUBSYSTEM=="cpu", ACTION=="add", TEST=="online", ATTR{online}=="0", ATTR{online}="1"
SUBSYSTEM=="memory", ACTION=="add", TEST=="state", ATTR{state}=="offline", ATTR{state}="online"
"""


def recipe_key(arch: str, node_deb: Path | None = None) -> str:
    """What the cached image depends on: this builder, the package list, the host's apt sources
    (and for the node flavour the .deb's content)."""
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(Path(guest_build_util.__file__).read_bytes())  # its disk making
    h.update(json.dumps([arch, SUITE, PACKAGES, KERNEL_PACKAGES[arch], BOOT_PACKAGES[arch]]).encode())
    if node_deb is not None:
        h.update(json.dumps(NODE_PACKAGES[arch]).encode())
        h.update(sha256_file(node_deb).encode())
    if HOST_SOURCES.is_file():
        h.update(HOST_SOURCES.read_bytes())
    return h.hexdigest()


def _write(root: Path, rel: str, text: str, mode: int = 0o644) -> None:
    p = root / rel.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    p.chmod(mode)


def _symlink(root: Path, rel: str, target: str) -> None:
    p = root / rel.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.is_symlink() or p.exists():
        p.unlink()
    p.symlink_to(target)


def _set_root_password(root: Path) -> None:
    """Root's password hash in the tree's /etc/shadow (SHA-512 crypt through openssl)."""
    hashed = run(["openssl", "passwd", "-6", "-salt", _PASSWORD_SALT, ROOT_PASSWORD], timeout=30).strip()
    shadow = root / "etc" / "shadow"
    lines = shadow.read_text().splitlines()
    out = [f"root:{hashed}:" + ":".join(line.split(":")[2:]) if line.startswith("root:") else line for line in lines]
    shadow.write_text("\n".join(out) + "\n")


def customize(root: Path, arch: str) -> None:
    """The files that make the installed tree a test guest (the docstring's protocol)."""
    console = CONSOLES[arch]
    _write(root, "/etc/hostname", HOSTNAME + "\n")
    _write(root, "/etc/hosts", f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n::1 localhost ip6-localhost\n")
    _write(root, "/etc/fstab", f"LABEL={LABEL} / ext4 rw,errors=remount-ro 0 1\n")
    _set_root_password(root)
    _write(root, "/root/.profile", "PS1='cna# '\nexport PS1\nstty cols 200 2>/dev/null\n")
    _write(root, "/root/.bashrc", "PS1='cna# '\n")
    _write(root, "/usr/local/sbin/cna-guest-marker", MARKER_SCRIPT.replace("@MARKER@", MARKER), 0o755)
    _write(root, "/etc/systemd/system/cna-guest-marker.service", MARKER_UNIT)
    _symlink(root, "/etc/systemd/system/multi-user.target.wants/cna-guest-marker.service",
             "/etc/systemd/system/cna-guest-marker.service")
    for unit in _MASKED_UNITS:
        _symlink(root, f"/etc/systemd/system/{unit}", "/dev/null")
    # The serial getty is started by systemd's getty generator from console=; say so explicitly
    # as well, so a kernel command line without console= still gets the login prompt.
    _symlink(root, f"/etc/systemd/system/getty.target.wants/serial-getty@{console}.service",
             "/lib/systemd/system/serial-getty@.service")
    _write(root, "/etc/cloud/cloud.cfg.d/90-cna-datasource.cfg", CLOUD_CFG)
    # Hot-added vCPUs and DIMMs come up offline in a Debian kernel; cloud images online them with
    # a udev rule (RHEL's 40-redhat.rules does the same), and so does this guest.
    _write(root, "/etc/udev/rules.d/80-cna-hotplug-online.rules", HOTPLUG_RULES)
    # A short default stop timeout: a test guest that hangs on the way down should say so quickly.
    _write(root, "/etc/systemd/system.conf.d/cna.conf", "[Manager]\nDefaultTimeoutStopSec=15s\n")
    (root / "etc" / "machine-id").write_text("")  # systemd makes one on first boot (a unique id per VM)


def _boot_files(root: Path) -> tuple[Path, Path, str]:
    boot = root / "boot"
    kernels = sorted(boot.glob("vmlinuz-*"))
    if not kernels:
        raise RuntimeError(f"no kernel in {boot}: is {KERNEL_PACKAGES} in the package list?")
    kernel = kernels[-1]
    version = kernel.name[len("vmlinuz-"):]
    initrd = boot / f"initrd.img-{version}"
    if not initrd.is_file():
        raise RuntimeError(f"no initramfs {initrd} for kernel {version}")
    return kernel, initrd, version


GRUB_CFG = """# cna-agent Debian test guest (tools/build-debian-guest.py): straight into the kernel
set timeout=0
search --no-floppy --label --set=root @LABEL@
set cna_ci="cloud-init=disabled"
if search --no-floppy --label --set=cna_seed CIDATA; then
  set cna_ci=""
elif search --no-floppy --label --set=cna_seed cidata; then
  set cna_ci=""
fi
linux /boot/vmlinuz-@VERSION@ root=LABEL=@LABEL@ rw console=@CONSOLE@ panic=-1 $cna_ci
initrd /boot/initrd.img-@VERSION@
boot
"""


def _partitioned_disk(raw: Path, root: Path, esp: Path, arch: str, version: str) -> None:
    """The GPT disk: the ESP with the signed boot chain, then the root filesystem made from the
    tree. Everything is written into the image file at its partitions' offsets (sfdisk on the
    file, ``mkfs.vfat --offset``, ``mcopy -i file@@offset``, ``mkfs.ext4 -E offset=``): no loop
    device and no mount, so the builder runs in containers and on CI hosts that have neither."""
    table = (f'label: gpt\nstart={ESP_START}, size={ESP_SECTORS}, type=U, name="EFI System"\n'
             f'start={ROOT_START}, size={ROOT_SECTORS}, type=L, name="{LABEL}"\n')
    # FAT32, as the UEFI specification asks of a system partition (one 512-byte sector per cluster
    # gives 64 MiB enough clusters for FAT32)
    esp_fs = fat_disk(raw, DISK_SECTORS * 512, table, ESP_START, ESP_SECTORS, ESP_LABEL, ("-F", "32", "-s", "1"))
    boot = esp / "EFI" / "BOOT"
    boot.mkdir(parents=True)
    for name, rel in EFI_FILES[arch].items():
        src = root / rel
        if not src.is_file():
            raise RuntimeError(f"{rel} is not in the tree: is {BOOT_PACKAGES[arch]} in the package list?")
        shutil.copyfile(src, boot / name)
    cfg = GRUB_CFG.replace("@LABEL@", LABEL).replace("@VERSION@", version).replace("@CONSOLE@", CONSOLES[arch])
    (boot / "grub.cfg").write_text(cfg)
    # Debian's signed GRUB has /EFI/debian as its built-in prefix and sources $prefix/grub.cfg
    # first; the copy beside it ($cmdpath) is what it reads when that directory is missing.
    (esp / "EFI" / "debian").mkdir()
    (esp / "EFI" / "debian" / "grub.cfg").write_text(cfg)
    run(["mcopy", "-s", "-i", esp_fs, str(esp / "EFI"), "::/"], timeout=60)
    run(["mkfs.ext4", "-q", "-F", "-L", LABEL, "-E", f"offset={ROOT_START * 512}", "-d", str(root), str(raw),
         f"{ROOT_SECTORS // 2}k"], timeout=600)


def build(arch: str, out: Path, *, refresh: bool = False, node_deb: Path | None = None) -> dict:
    """Build the image into out/ unless a valid cached build is there; return the manifest."""
    if arch not in ARCHES:
        raise SystemExit(f"unknown arch {arch!r}; one of {sorted(ARCHES)}")
    if node_deb is not None:
        node_deb = node_deb.resolve()
        if not node_deb.is_file():
            raise SystemExit(f"--node-deb {node_deb}: no such file")
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)  # parallel test processes build once
        key = recipe_key(arch, node_deb)
        manifest_path = out / "manifest.json"
        if manifest_path.is_file() and not refresh:
            m = json.loads(manifest_path.read_text())
            if m.get("recipe") == key and all(Path(m[k]).is_file() for k in ("disk", "kernel", "initrd")):
                return m
        return _build(arch, out, key, node_deb)


def _build(arch: str, out: Path, key: str, node_deb: Path | None = None) -> dict:
    if shutil.which("mmdebstrap") is None:
        raise RuntimeError("mmdebstrap is not installed (tools/setup.sh installs it)")
    work = Path(tempfile.mkdtemp(prefix="debian-guest.", dir=out))
    try:
        root = work / "root"
        args = ["mmdebstrap", "--mode=root", "--variant=minbase", f"--architectures={ARCHES[arch]}",
                "--include=" + ",".join([*PACKAGES, KERNEL_PACKAGES[arch], *BOOT_PACKAGES[arch]]),
                "--aptopt=Acquire::Retries \"3\"", "--aptopt=Acquire::Languages \"none\"",
                *[f"--dpkgopt=path-exclude={p}" for p in _DPKG_EXCLUDES],
                *[f"--dpkgopt=path-include={p}" for p in _DPKG_KEEP],
                SUITE, str(root)]
        if node_deb is not None:
            # A path as its own --include: apt installs the file and resolves its Depends. apt
            # hands dpkg (in the chroot) the path verbatim; mmdebstrap's hook makes it exist there.
            args[3:3] = ["--include=" + ",".join(NODE_PACKAGES[arch]), f"--include={node_deb}",
                         "--hook-dir=/usr/share/mmdebstrap/hooks/file-mirror-automount"]
        if HOST_SOURCES.is_file():
            args.append(str(HOST_SOURCES))
        run(args, timeout=1200)
        customize(root, arch)
        kernel, initrd, version = _boot_files(root)
        for src, name in ((kernel, "vmlinuz"), (initrd, "initrd.img")):
            shutil.copyfile(src, work / name)
            (work / name).chmod(0o644)
        raw = work / "disk.raw"
        _partitioned_disk(raw, root, work / "esp", arch, version)
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(work / "disk.qcow2")], timeout=600)
        packages = run(["chroot", str(root), "dpkg-query", "-W", "-f=${Package}=${Version}\\n",
                        "systemd", "qemu-guest-agent", "cloud-init", KERNEL_PACKAGES[arch], *BOOT_PACKAGES[arch],
                        *(["cna-agent", "libvirt0", *NODE_PACKAGES[arch]] if node_deb is not None else [])],
                       timeout=60).split()
        for name in ("disk.qcow2", "vmlinuz", "initrd.img"):
            os.replace(work / name, out / name)
        manifest = {
            "arch": arch, "os": "debian", "suite": SUITE, "kernel_version": version, "packages": packages,
            "disk": str(out / "disk.qcow2"), "disk_format": "qcow2", "kernel": str(out / "vmlinuz"),
            "initrd": str(out / "initrd.img"), "console": CONSOLES[arch], "marker": MARKER,
            "cmdline": f"root=LABEL={LABEL} rw console={CONSOLES[arch]} panic=-1",
            "cmdline_without_seed": f"root=LABEL={LABEL} rw console={CONSOLES[arch]} panic=-1 cloud-init=disabled",
            "hostname": HOSTNAME, "root_password": ROOT_PASSWORD, "recipe": key,
            "esp_label": ESP_LABEL, "efi_loader": f"/EFI/BOOT/{next(iter(EFI_FILES[arch]))}",
            "secure_boot_chain": ["shim (Microsoft UEFI CA)", "grub (Debian)", "linux (Debian)"],
            "disk_sha256": sha256_file(out / "disk.qcow2"),
            "flavour": "node" if node_deb is not None else "guest",
        }
        tmp = out / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, out / "manifest.json")
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def default_out(arch: str, node: bool = False) -> Path:
    base = os.environ.get("CNA_GUEST_CACHE")
    return (Path(base) if base else REPO / ".cache" / "guests") / (f"debian-node-{arch}" if node else f"debian-{arch}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="x86_64", choices=sorted(ARCHES))
    ap.add_argument("--out", type=Path, help="output dir (default .cache/guests/debian-<arch>)")
    ap.add_argument("--refresh", action="store_true", help="rebuild even when the cached image matches the recipe")
    ap.add_argument("--print-json", action="store_true", help="print the manifest as JSON on stdout")
    ap.add_argument("--node-deb", type=Path, help="build the node flavour with this cna-agent .deb installed "
                                                   "(default out: .cache/guests/debian-node-<arch>)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("build-debian-guest.py: run as root (mmdebstrap's root mode)", file=sys.stderr)
        return 1
    m = build(a.arch, a.out or default_out(a.arch, a.node_deb is not None), refresh=a.refresh, node_deb=a.node_deb)
    print(json.dumps(m) if a.print_json else f"debian guest ({a.arch}): {m['disk']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
