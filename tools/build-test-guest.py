#!/usr/bin/env python3
"""Build (and cache) a bootable test guest: a Debian cloud kernel plus a busybox initramfs.

Why: integration tests must *observe* that a VM runs (DESIGN.md, "Test guests"), not assume it.
A full distro image is slow under TCG and large; a cloud kernel with a static busybox initramfs
boots in a few seconds, prints machine-readable lines on the serial console and gives a shell.

Usage::

    tools/build-test-guest.py [--arch x86_64|aarch64] [--out DIR] [--refresh] [--print-json]
                              [--boot-disk] [--efi-boot-disk]

Output (default ``<repo>/.cache/guests/<arch>/``, or ``$CNA_GUEST_CACHE/<arch>/``, or ``--out``):
``vmlinuz``, ``initrd.gz``, ``manifest.json``; with ``--boot-disk`` (x86_64) also ``disk.raw``: a
64 MiB MBR disk whose first partition (FAT16, 40 MiB) holds the same kernel and initramfs behind
SYSLINUX, so SeaBIOS boots the guest *from the disk* (root-disk tests: a LUN, an imported vmdk, a
linked clone) with ``cna.bootsrc=disk`` on its command line; the last 23 MiB are unpartitioned
scratch space a test may write to (tools/guest_boot_disk.py builds it). With ``--efi-boot-disk``
(aarch64) also ``disk-efi.raw``: a 64 MiB GPT disk whose EFI System Partition (FAT16, 62 MiB)
holds Debian's signed GRUB as ``/EFI/BOOT/BOOTAA64.EFI`` (package grub-efi-arm64-signed, fetched
like the kernel), a grub.cfg and the same kernel and initramfs, so AAVMF boots the guest *from
the disk* through GRUB with ``cna.bootsrc=efi-disk`` on its command line, as TaiShan hosts boot
their guests (tools/guest_efi_disk.py builds it; rebuilt when its inputs or that file change).
The JSON keys are ``boot_disk`` and ``efi_boot_disk``. The guest is rebuilt only when a file is
missing or the recipe (this script, its sibling modules guest_boot_disk.py and guest_build_util.py,
+ arch) changed; ``--refresh`` also re-resolves the newest kernel package (and GRUB's, for the
UEFI disk) and rebuilds when its version changed. Only the Python standard library,
``apt-get``/``apt-cache`` and ``dpkg-deb`` are used; foreign-architecture packages are fetched
with private apt lists so the host's dpkg architectures are never changed.

Guest console protocol (console: ttyS0 on x86_64, ttyAMA0 on aarch64; pass ``console=<tty>``):

* ``CNA-FACT key=value`` lines (arch, kernel, cpus, numa_nodes, mem_kb, net, block, per-device
  details, boot, bootsrc = ``kernel`` or the ``cna.bootsrc=`` value) are printed first, then the marker ``CNA-GUEST-READY boot=<n>``
  (``cna.marker=WORD`` on the kernel command line replaces ``CNA-GUEST-READY``). ``n`` is a boot
  counter kept in the first 16 bytes of a disk whose serial is ``cna-state`` (attach a small raw
  file to count boots); without that disk it is always 1 (x86 CMOS NVRAM was tried: Linux's
  /dev/nvram refuses I/O because QEMU's CMOS checksum does not match). Count marker lines in
  the serial log to see reboots without a state disk.
* ``cna.ip=ADDR/PREFIX`` configures the first NIC, ``cna.ip.ethN=ADDR/PREFIX`` a given one,
  ``cna.gw=ADDR`` a default route. All NICs are set up.
* ``CNA-HOTPLUG add|remove net|block NAME`` when NICs/disks appear or disappear (1 s polling).
* ACPI power button (x86_64) / PL061 GPIO power key (aarch64, the gpio_keys driver is not in the
  cloud kernel so the GPIO line is polled): prints ``CNA-GUEST-POWEROFF`` and powers off.
* Then a root shell on the console with prompt ``cna# `` (respawned when it exits).
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import sys
import tempfile
from pathlib import Path

# The sibling modules live next to this file. Python puts tools/ on sys.path when this runs as
# a script, but not when it is loaded by path (importlib.util.spec_from_file_location), so
# make sure either way.
_TOOLS_DIR = str(Path(__file__).resolve().parent)
if _TOOLS_DIR not in sys.path:
    sys.path.insert(0, _TOOLS_DIR)

import guest_boot_disk
import guest_build_util
from guest_boot_disk import (  # noqa: F401  (re-exported: the script keeps its names)
    BOOT_PART_SECTORS,
    BOOT_PART_START,
    DISK_SIZE,
    SYSLINUX_CFG,
    SYSLINUX_MBR,
    build_boot_disk,
)
from guest_build_util import TIMEOUT_APT, run, sha256_file  # noqa: F401  (TIMEOUT_APT: re-exported)
from guest_efi_disk import EFI_GRUB_PACKAGE, build_efi_boot_disk

REPO = Path(__file__).resolve().parent.parent
ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}
CONSOLES = {"x86_64": "ttyS0", "aarch64": "ttyAMA0"}
MARKER = "CNA-GUEST-READY"

# Modules loaded at boot when the kernel has them as modules (built-ins and absent ones are
# skipped). Kept short so the initramfs stays small; their dependencies are added automatically.
WANTED_MODULES = [
    "virtio_pci", "virtio_mmio", "virtio_blk", "virtio_net", "virtio_scsi", "sd_mod",
    "virtio_console", "virtio_balloon", "virtio_rng", "failover", "net_failover",
    "e1000e", "e1000", "evdev", "button",
    # pvpanic: a guest panic reaches QEMU (GUEST_PANICKED) through the ISA/MMIO or PCI device
    "pvpanic_mmio", "pvpanic_pci",
]

INIT_SCRIPT = r"""#!/bin/sh
# cna-agent test guest init (generated by tools/build-test-guest.py; protocol in its docstring)
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp /run
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts 2>/dev/null
# keep kernel messages off the console so protocol lines stay whole
echo 1 > /proc/sys/kernel/printk

CMDLINE=$(cat /proc/cmdline)
arg() { for w in $CMDLINE; do case "$w" in "$1="*) echo "${w#*=}"; return 0;; esac; done; return 1; }
MARKER=$(arg cna.marker) || MARKER=@MARKER@
ARCH=$(uname -m)
CONSOLE=$(sed 's/.* //' /sys/class/tty/console/active 2>/dev/null)
[ -n "$CONSOLE" ] || CONSOLE=@CONSOLE@
say() { echo "$*" > /dev/console; }
# asynchronous lines start on a fresh line: the shell prompt may be pending on the console
say_async() { printf '\n%s\n' "$*" > /dev/console; }

for m in @MODULES@; do modprobe -q "$m" 2>/dev/null; done
# module probing is synchronous; devtmpfs nodes follow immediately

nics() { ls /sys/class/net | grep -v '^lo$' | sort; }
disks() { ls /sys/block | grep -v -E '^(loop|ram|zram)' | sort; }

# --- boot counter -------------------------------------------------------------------------
BOOT=
STATE_DEV=
for b in /sys/block/*; do
  [ "$(cat $b/serial 2>/dev/null)" = cna-state ] && STATE_DEV=/dev/${b##*/}
done
if [ -n "$STATE_DEV" ]; then
  n=$(dd if=$STATE_DEV bs=16 count=1 2>/dev/null | tr -dc 0-9)
  BOOT=$(( ${n:-0} + 1 ))
  printf '%-16s' "$BOOT" | dd of=$STATE_DEV bs=16 count=1 conv=notrunc,fsync 2>/dev/null
fi
[ -n "$BOOT" ] || BOOT=1

# --- network ---------------------------------------------------------------------------------
ip link set lo up
FIRST=$(nics | head -n1)
for n in $(nics); do ip link set "$n" up 2>/dev/null; done
for w in $CMDLINE; do
  case "$w" in
    cna.ip=*) [ -n "$FIRST" ] && ip addr add "${w#*=}" dev "$FIRST" ;;
    cna.ip.*=*) dev=${w#cna.ip.}; dev=${dev%%=*}; ip addr add "${w#*=}" dev "$dev" ;;
  esac
done
GW=$(arg cna.gw) && ip route add default via "$GW"

# --- facts -----------------------------------------------------------------------------------
fact() { say "CNA-FACT $1=$2"; }
fact arch "$ARCH"
fact kernel "$(uname -r)"
fact cpus "$(ls -d /sys/devices/system/cpu/cpu[0-9]* | wc -l)"
fact cpus_online "$(cat /sys/devices/system/cpu/online)"
NODES=$(ls -d /sys/devices/system/node/node[0-9]* 2>/dev/null | wc -l)
fact numa_nodes "$NODES"
for nd in /sys/devices/system/node/node[0-9]*; do
  [ -d "$nd" ] || continue
  fact "${nd##*/}.cpus" "$(cat $nd/cpulist)"
  fact "${nd##*/}.mem_kb" "$(awk '/MemTotal/ {print $4}' $nd/meminfo)"
done
fact mem_kb "$(awk '/^MemTotal/ {print $2}' /proc/meminfo)"
m=$(cat /sys/devices/system/cpu/cpu0/regs/identification/midr_el1 2>/dev/null) && fact midr_el1 "$m"
fact net "$(nics | tr '\n' ',' | sed 's/,$//')"
for n in $(nics); do
  fact "net.$n.mac" "$(cat /sys/class/net/$n/address)"
  fact "net.$n.driver" "$(basename "$(readlink /sys/class/net/$n/device/driver 2>/dev/null)" 2>/dev/null)"
  a=$(ip -o -4 addr show dev "$n" | awk '{print $4}' | tr '\n' ',' | sed 's/,$//')
  [ -n "$a" ] && fact "net.$n.ipv4" "$a"
done
fact block "$(disks | tr '\n' ',' | sed 's/,$//')"
for d in $(disks); do
  fact "block.$d.sectors" "$(cat /sys/block/$d/size)"
  s=$(cat /sys/block/$d/serial 2>/dev/null) && [ -n "$s" ] && fact "block.$d.serial" "$s"
done
fact boot "$BOOT"
fact bootsrc "$(arg cna.bootsrc || echo kernel)"

# --- hot-plug watcher ------------------------------------------------------------------------
(
  old_n=" $(nics | tr '\n' ' ')"; old_b=" $(disks | tr '\n' ' ')"
  while sleep 1; do
    new_n=" $(nics | tr '\n' ' ')"; new_b=" $(disks | tr '\n' ' ')"
    for x in $new_n; do case "$old_n" in *" $x "*) ;; *) ip link set "$x" up 2>/dev/null; say_async "CNA-HOTPLUG add net $x";; esac; done
    for x in $old_n; do case "$new_n" in *" $x "*) ;; *) say_async "CNA-HOTPLUG remove net $x";; esac; done
    for x in $new_b; do case "$old_b" in *" $x "*) ;; *) say_async "CNA-HOTPLUG add block $x";; esac; done
    for x in $old_b; do case "$new_b" in *" $x "*) ;; *) say_async "CNA-HOTPLUG remove block $x";; esac; done
    old_n=$new_n; old_b=$new_b
  done
) &

# --- power button ----------------------------------------------------------------------------
power_off() { say_async "CNA-GUEST-POWEROFF"; sync; poweroff -f; }
# The device is opened here, before the marker, and handed to the reader: evdev queues events
# only for readers that hold it open, and a reader that opened it itself could be scheduled after
# a press that came right after the marker (CI saw a shutdown lost that way under load).
for ev in /sys/class/input/event*; do
  [ -e "$ev" ] || continue
  case "$(cat $ev/device/name 2>/dev/null)" in
    *"Power Button"*)
      # the power-button device only reports that key: any event is a press
      exec 5</dev/input/${ev##*/}
      ( dd bs=24 count=1 of=/dev/null 2>/dev/null <&5 && power_off ) &
      exec 5<&- ;;
  esac
done
if [ "$ARCH" = aarch64 ]; then
  # QEMU virt (DT boot): power key = PL061 pin 3, pulsed high for 100 ms
  for c in /sys/class/gpio/gpiochip*; do
    case "$(cat $c/label 2>/dev/null)" in *pl061*)
      g=$(( $(cat $c/base) + 3 ))
      echo $g > /sys/class/gpio/export 2>/dev/null
      echo in > /sys/class/gpio/gpio$g/direction 2>/dev/null
      (
        mkfifo /run/gpio-tick; exec 3<>/run/gpio-tick
        while :; do
          read v < /sys/class/gpio/gpio$g/value
          [ "$v" = 1 ] && power_off
          read -t 0.03 x <&3
        done
      ) & ;;
    esac
  done
fi

# the marker comes only now, so a power button pressed once it is seen is always handled
say "$MARKER boot=$BOOT"

# --- interactive shell on the console --------------------------------------------------------
stty -F /dev/$CONSOLE cols 4096 rows 50 2>/dev/null
export PS1='cna# ' HOME=/root TERM=dumb
mkdir -p /root
while :; do
  setsid sh -c "exec sh -i <>/dev/$CONSOLE >&0 2>&1"
  sleep 0.2
done
"""


def host_deb_arch() -> str:
    return run(["dpkg", "--print-architecture"], timeout=30).strip()


class Apt:
    """apt-cache/apt-get for one Debian architecture.

    For a foreign architecture (or when the host has no package lists) it uses private lists and
    cache dirs, so the host's apt state and dpkg architectures stay untouched.
    """

    def __init__(self, deb_arch: str, state_dir: Path) -> None:
        self.deb_arch = deb_arch
        self.state_dir = state_dir
        self.opts: list[str] = []
        self._private = deb_arch != host_deb_arch()
        if not self._private and not self._has_candidate("linux-image-cloud-" + deb_arch):
            self._private = True
        if self._private:
            lists = state_dir / "lists"
            cache = state_dir / "cache"
            self.opts = [
                f"-oAPT::Architecture={deb_arch}", f"-oAPT::Architectures={deb_arch}",
                f"-oDir::State::Lists={lists}", f"-oDir::Cache={cache}",
            ]

    def _has_candidate(self, pkg: str) -> bool:
        try:
            return bool(run(["apt-cache", *self.opts, "show", "--no-all-versions", pkg], timeout=120).strip())
        except RuntimeError:
            return False

    def update(self, force: bool = False) -> None:
        """Fetch package lists into the private dir (once, or again with force)."""
        if not self._private:
            return
        lists = self.state_dir / "lists"
        if not force and any(lists.glob("*_Packages*")):
            return
        (lists / "partial").mkdir(parents=True, exist_ok=True)
        (self.state_dir / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        run(["apt-get", "-q", *self.opts, "update"])

    def show(self, pkg: str) -> dict[str, str]:
        """Control fields of the candidate version of pkg (RFC 822 style, parsed, not scraped)."""
        text = run(["apt-cache", *self.opts, "show", "--no-all-versions", pkg], timeout=120)
        fields: dict[str, str] = {}
        key = None
        for line in text.splitlines():
            if not line.strip():
                if fields:
                    break
                continue
            if line[0] in " \t" and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, val = line.partition(":")
                fields[key] = val.strip()
        if not fields:
            raise RuntimeError(f"apt-cache show {pkg} ({self.deb_arch}): no candidate")
        return fields

    def download(self, pkgs: list[str], dest: Path) -> list[Path]:
        dest.mkdir(parents=True, exist_ok=True)
        before = set(dest.glob("*.deb"))
        run(["apt-get", "-q", *self.opts, "download", *pkgs], cwd=dest)
        got = sorted(set(dest.glob("*.deb")) - before) or sorted(dest.glob("*.deb"))
        return got


def resolve_packages(apt: Apt, deb_arch: str) -> tuple[str, str, str]:
    """Return (versioned kernel package, its version, busybox-static version)."""
    meta = apt.show(f"linux-image-cloud-{deb_arch}")
    dep = meta["Depends"].split(",")[0].split("|")[0].strip()
    kpkg = dep.split()[0]
    kver = apt.show(kpkg)["Version"]
    bver = apt.show("busybox-static")["Version"]
    return kpkg, kver, bver


def find_deb(debs_dir: Path, pkg: str, version: str, deb_arch: str) -> Path | None:
    """The cached .deb for pkg=version, matching apt-get download's file name (epoch as %3a)."""
    ver = version.replace(":", "%3a")
    p = debs_dir / f"{pkg}_{ver}_{deb_arch}.deb"
    return p if p.exists() else None


# ------------------------------------------------------------------------------------------------
# kernel modules: dependencies read from each module's .modinfo ELF section (no depmod needed,
# which also works for foreign-architecture modules)


def modinfo(path: Path) -> dict[str, list[str]]:
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise RuntimeError(f"{path}: not an ELF64 module")
    end = "<" if data[5] == 1 else ">"
    shoff, = struct.unpack_from(end + "Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x3A)

    def sh(i: int) -> tuple[int, int, int]:
        name, _typ, _flags, _addr, off, size = struct.unpack_from(end + "IIQQQQ", data, shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = sh(shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name, off, size = sh(i)
        nm = data[stroff + name: data.index(b"\0", stroff + name)]
        if nm == b".modinfo":
            for item in data[off: off + size].split(b"\0"):
                if b"=" in item:
                    k, _, v = item.decode(errors="replace").partition("=")
                    info.setdefault(k, []).append(v)
    return info


def select_modules(moddir: Path, wanted: list[str]) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """Map module name -> path for wanted modules and their dependencies (transitively)."""
    by_name: dict[str, Path] = {}
    for p in (moddir / "kernel").rglob("*.ko"):
        by_name[p.name[:-3].replace("-", "_")] = p
    chosen: dict[str, Path] = {}
    deps: dict[str, list[str]] = {}
    todo = [w.replace("-", "_") for w in wanted if w.replace("-", "_") in by_name]
    while todo:
        n = todo.pop()
        if n in chosen:
            continue
        chosen[n] = by_name[n]
        d = [x.replace("-", "_") for x in ",".join(modinfo(by_name[n]).get("depends", [""])).split(",") if x]
        deps[n] = [x for x in d if x in by_name]
        todo.extend(deps[n])
    return chosen, deps


def modules_dep(chosen: dict[str, Path], deps: dict[str, list[str]], moddir: Path) -> str:
    """modules.dep text in depmod's order: each dependency is listed before its own dependencies,
    so a modprobe that loads the list back to front always inserts a module after what it needs."""
    lines = []
    for n in sorted(chosen):
        post: list[str] = []

        def visit(m: str) -> None:
            for x in deps.get(m, []):
                if x not in post:
                    visit(x)
            if m not in post:
                post.append(m)

        for x in deps[n]:
            visit(x)
        order = list(reversed(post))
        rel = lambda m: str(chosen[m].relative_to(moddir))  # noqa: E731
        lines.append(f"{rel(n)}: {' '.join(rel(x) for x in order)}".rstrip())
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# cpio "newc" writer (so no host cpio and no root are needed for device nodes)


class Cpio:
    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nm = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08X}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nm), 0))
        self.ino += 1
        self.buf.write(hdr.encode() + nm)
        self.buf.write(b"\0" * ((4 - (110 + len(nm)) % 4) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * ((4 - len(data) % 4) % 4))

    def dir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.seen:
                self.seen.add(d)
                self._entry(d, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        name = name.strip("/")
        if "/" in name:
            self.dir(name.rsplit("/", 1)[0])
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name.strip("/"), stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name.strip("/"), stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


# ------------------------------------------------------------------------------------------------


#: The builder's code: this script and the sibling modules it imports. A change to any of
#: them rebuilds the guest (and so the boot disk), as a change to this one file always did.
RECIPE_FILES = (Path(__file__), Path(guest_build_util.__file__), Path(guest_boot_disk.__file__))


def recipe_hash(arch: str) -> str:
    """What the cached guest depends on besides the .debs: this builder's code and the arch."""
    h = hashlib.sha256()
    for p in RECIPE_FILES:
        h.update(p.read_bytes())
    h.update(arch.encode())
    return h.hexdigest()


def build(arch: str, out: Path, refresh: bool = False, log=print) -> dict:
    """Build the guest into out/ unless a valid cached build is there; return the manifest."""
    deb_arch = ARCHES[arch]
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    with (out / ".lock").open("w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)  # parallel test workers build once
        old = None
        if manifest_path.exists():
            try:
                old = json.loads(manifest_path.read_text())
            except ValueError:
                old = None
        fresh = bool(old and old.get("recipe_hash") == recipe_hash(arch)
                     and (out / "vmlinuz").exists() and (out / "initrd.gz").exists())
        if fresh and not refresh:
            return old

        apt = Apt(deb_arch, out / "apt")
        apt.update(force=refresh)
        kpkg, kver, bver = resolve_packages(apt, deb_arch)
        if fresh and old and old.get("kernel_package") == kpkg and old.get("kernel_version") == kver \
                and old.get("busybox_version") == bver:
            return old
        debs = out / "debs"
        kdeb = find_deb(debs, kpkg, kver, deb_arch)
        bdeb = find_deb(debs, "busybox-static", bver, deb_arch)
        if not kdeb or not bdeb:
            for p in debs.glob("*.deb") if debs.exists() else []:
                p.unlink()  # drop older versions
            log(f"downloading {kpkg}={kver} busybox-static={bver} ({deb_arch})")
            apt.download([f"{kpkg}={kver}", f"busybox-static={bver}"], debs)
            kdeb = find_deb(debs, kpkg, kver, deb_arch)
            bdeb = find_deb(debs, "busybox-static", bver, deb_arch)
            if not kdeb or not bdeb:
                raise RuntimeError(f"download did not produce the expected debs in {debs}: "
                                   f"{[p.name for p in debs.glob('*.deb')]}")

        with tempfile.TemporaryDirectory(prefix="cna-guest-", dir=out) as tmp:
            t = Path(tmp)
            run(["dpkg-deb", "-x", str(kdeb), str(t / "k")], timeout=300)
            run(["dpkg-deb", "-x", str(bdeb), str(t / "b")], timeout=120)
            vmlinuz = next((t / "k" / "boot").glob("vmlinuz-*"))
            kernel_release = vmlinuz.name[len("vmlinuz-"):]
            moddir = next(p for p in (t / "k").glob("*lib/modules/*") if p.name == kernel_release)
            chosen, deps = select_modules(moddir, WANTED_MODULES)

            c = Cpio()
            for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "root", "etc"):
                c.dir(d)
            c.chardev("dev/console", 5, 1)
            c.chardev("dev/null", 1, 3)
            c.file("bin/busybox", (t / "b" / "bin" / "busybox").read_bytes(), 0o755)
            c.symlink("bin/sh", "busybox")
            init = (INIT_SCRIPT.replace("@MARKER@", MARKER).replace("@CONSOLE@", CONSOLES[arch])
                    .replace("@MODULES@", " ".join(w for w in WANTED_MODULES if w in chosen)))
            c.file("init", init.encode(), 0o755)
            mroot = f"lib/modules/{kernel_release}"
            for n, p in sorted(chosen.items()):
                c.file(f"{mroot}/{p.relative_to(moddir)}", p.read_bytes())
            c.file(f"{mroot}/modules.dep", modules_dep(chosen, deps, moddir).encode())
            for extra in ("modules.builtin", "modules.order"):
                if (moddir / extra).exists():
                    c.file(f"{mroot}/{extra}", (moddir / extra).read_bytes())
            c.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
            initrd = gzip.compress(c.finish(), compresslevel=6, mtime=0)

            (out / "initrd.gz.new").write_bytes(initrd)
            shutil.copyfile(vmlinuz, out / "vmlinuz.new")
            os.replace(out / "initrd.gz.new", out / "initrd.gz")
            os.replace(out / "vmlinuz.new", out / "vmlinuz")

        manifest = {
            "arch": arch,
            "kernel": str(out / "vmlinuz"),
            "initrd": str(out / "initrd.gz"),
            "marker": MARKER,
            "console": CONSOLES[arch],
            "kernel_release": kernel_release,
            "kernel_package": kpkg,
            "kernel_version": kver,
            "busybox_version": bver,
            "modules": sorted(chosen),
            "recipe_hash": recipe_hash(arch),
            "inputs_hash": hashlib.sha256(
                (recipe_hash(arch) + sha256_file(kdeb) + sha256_file(bdeb)).encode()).hexdigest(),
        }
        tmpm = out / "manifest.json.new"
        tmpm.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmpm, manifest_path)
        log(f"built {arch} guest: {kernel_release}, initrd {len(initrd) // 1024} KiB, "
            f"{len(chosen)} modules")
        return manifest


def grub_efi_deb(arch: str, out: Path, refresh: bool = False, log=print) -> Path:
    """The cached grub-efi-arm64-signed .deb under out/efi-debs/, downloaded the first time (or
    again with refresh when a newer version is out) through the guest's private apt lists.

    Kept apart from out/debs/, which the guest build empties when the kernel changes."""
    deb_arch = ARCHES[arch]
    debs = out / "efi-debs"
    have = sorted(debs.glob(f"{EFI_GRUB_PACKAGE}_*_{deb_arch}.deb")) if debs.exists() else []
    if have and not refresh:
        return have[-1]
    apt = Apt(deb_arch, out / "apt")
    apt.update(force=refresh)
    ver = apt.show(EFI_GRUB_PACKAGE)["Version"]
    deb = find_deb(debs, EFI_GRUB_PACKAGE, ver, deb_arch)
    if deb is None:
        for p in have:
            p.unlink()  # drop older versions
        log(f"downloading {EFI_GRUB_PACKAGE}={ver} ({deb_arch})")
        apt.download([f"{EFI_GRUB_PACKAGE}={ver}"], debs)
        deb = find_deb(debs, EFI_GRUB_PACKAGE, ver, deb_arch)
        if deb is None:
            raise RuntimeError(f"download did not produce {EFI_GRUB_PACKAGE}={ver} in {debs}")
    return deb


def default_out(arch: str) -> Path:
    base = os.environ.get("CNA_GUEST_CACHE")
    return (Path(base) if base else REPO / ".cache" / "guests") / arch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=sorted(ARCHES), default=os.uname().machine
                    if os.uname().machine in ARCHES else "x86_64")
    ap.add_argument("--out", type=Path, help="output dir (default $CNA_GUEST_CACHE/<arch> or .cache/guests/<arch>)")
    ap.add_argument("--refresh", action="store_true", help="re-resolve the newest kernel and rebuild if it changed")
    ap.add_argument("--print-json", action="store_true", help="print kernel/initrd/arch/marker/console as JSON")
    ap.add_argument("--boot-disk", action="store_true", help="also build disk.raw, a BIOS-bootable disk (x86_64)")
    ap.add_argument("--efi-boot-disk", action="store_true",
                    help="also build disk-efi.raw, a UEFI-bootable disk with GRUB (aarch64)")
    a = ap.parse_args(argv)
    out = (a.out or default_out(a.arch)).resolve()
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    try:
        m = build(a.arch, out, refresh=a.refresh, log=log)
        info = {k: m[k] for k in ("kernel", "initrd", "arch", "marker", "console")}
        if a.boot_disk:
            info["boot_disk"] = str(build_boot_disk(a.arch, out, m, log=log))
        if a.efi_boot_disk:
            fetch = lambda: grub_efi_deb(a.arch, out, refresh=a.refresh, log=log)  # noqa: E731
            info["efi_boot_disk"] = str(build_efi_boot_disk(a.arch, out, m, fetch, log=log))
    except RuntimeError as e:
        print(f"build-test-guest: {e}", file=sys.stderr)
        return 1
    if a.print_json:
        print(json.dumps(info))
    else:
        print("\n".join(f"{k}={v}" for k, v in info.items() if k in ("kernel", "initrd", "boot_disk", "efi_boot_disk")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
