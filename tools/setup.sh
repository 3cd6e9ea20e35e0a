#!/usr/bin/env bash
# Install everything cna-agent needs on a fresh Debian/Ubuntu host (run as root), then build
# the agent into ./.venv. Idempotent: a second run only checks.
#
#   tools/setup.sh            runtime + test dependencies (what the README's commands use)
#
# Debian packages: libvirt's QEMU driver (the agent embeds it when no libvirtd runs), QEMU
# for x86_64 and aarch64 guests with their UEFI firmware, qemu-img, libvirt headers to build
# libvirt-python against THIS host's libvirt (a PyPI binding newer than the host library has
# hung other agents: DESIGN.md), Open vSwitch, tgt (iSCSI target for tests), open-iscsi and
# libiscsi tools, and what the test-guest builder uses (cpio, apt's download; syslinux, mtools,
# dosfstools and fdisk for the BIOS-bootable disk image).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${CNA_VENV:-$repo/.venv}"
python="${PYTHON:-python3}"

debs=(
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-system libvirt-clients libvirt-dev pkg-config
  libxml2-utils
  qemu-system-x86 qemu-system-arm qemu-utils qemu-block-extra ovmf qemu-efi-aarch64
  openvswitch-switch nftables ethtool iputils-ping tgt open-iscsi libiscsi-bin
  gcc libc6-dev cpio gzip iproute2 openssl procps
  syslinux syslinux-common mtools dosfstools fdisk
  swtpm swtpm-tools  # spec.tpm: libvirt starts swtpm (swtpm_setup on a first start)
  mmdebstrap e2fsprogs  # the real Debian guest (tools/build-debian-guest.py): packages into a tree, mkfs.ext4 -d
  tmux  # cna-ctl checked in a real terminal (tests/e2e/test_cli_terminal.py)
  prometheus  # a real server scrapes the agent's endpoint, promtool lints it (tests/e2e/test_prometheus_scrape.py)
  # Building the distribution packages (tests/packaging, README "Packages"): debhelper/pybuild,
  # the distribution's protoc + gRPC plugin and python3 runtime (the .deb's gencode and its
  # import check), argparse-manpage for the man pages, lintian, and rpm for the openEuler spec.
  dpkg-dev debhelper dh-python pybuild-plugin-pyproject fakeroot python3-all-dev python3-setuptools
  python3-wheel python3-cffi python3-build python3-installer protobuf-compiler protobuf-compiler-grpc
  libprotobuf-dev python3-grpcio python3-protobuf python3-libvirt python3-psutil python3-pyroute2
  python3-openvswitch python3-yaml python3-prometheus-client python3-argparse-manpage lintian rpm git
)

if [ "$(id -u)" -ne 0 ]; then
  echo "tools/setup.sh: run as root (it installs Debian packages and the agent manages VMs)" >&2
  exit 1
fi

missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "== installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  timeout 900 apt-get update -q
  # Daemons must not be started by package scripts here (no systemd in containers/CI):
  # policy-rc.d 101 tells invoke-rc.d to skip them; the testbed starts what tests need.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  timeout 1800 apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

"$python" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"cna-agent needs Python 3.11 or newer, found {sys.version.split()[0]}")
PY

if [ ! -x "$venv/bin/python" ]; then
  echo "== creating $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip setuptools wheel

host_libvirt="$(pkg-config --modversion libvirt)"
have_binding="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("libvirt-python"))' 2>/dev/null || true)"
if [ "$have_binding" != "$host_libvirt" ]; then
  echo "== building libvirt-python $host_libvirt against the host's libvirt"
  "${pip[@]}" install "libvirt-python==$host_libvirt"
fi

echo "== installing cna-agent (editable, with test extras) into $venv"
"${pip[@]}" install -e "$repo[test]"
"$venv/bin/cna-agent" --version
