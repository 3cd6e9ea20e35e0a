#!/usr/bin/env bash
# Build the Debian package and the openEuler RPM into OUTDIR (default: ./dist-packages), from a
# copy of the tracked tree (plus new files not ignored), never in the checkout, with the system's
# PATH so no venv or pyenv interpreter ends up in a shebang. tools/setup.sh installs the build
# tools (dpkg-dev, debhelper, dh-python, rpm, argparse-manpage, protoc and the gRPC plugin).
#
#   tools/build-packages.sh [OUTDIR]     # -> OUTDIR/cna-agent_VERSION_ARCH.deb (+ -dbgsym, .changes,
#                                        #    .buildinfo) and OUTDIR/cna-agent-VERSION-1.ARCH.rpm
#   CNA_PACKAGES="deb" tools/build-packages.sh OUTDIR   # only one of them ("deb", "rpm")
#
# The RPM is built with --nodeps on a Debian host: its BuildRequires name openEuler packages,
# which an empty rpm database cannot know (tools/setup.sh installs the Debian equivalents).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-$repo/dist-packages}" && cd "${1:-$repo/dist-packages}" && pwd)"
which="${CNA_PACKAGES:-deb rpm}"
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8
version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$repo/cna_agent/__init__.py")"
[ -n "$version" ] || { echo "build-packages.sh: no __version__ in cna_agent/__init__.py" >&2; exit 1; }
work="$(mktemp -d "${TMPDIR:-/tmp}/cna-packages.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# What a release tarball holds: tracked and new files, not the generated protobuf code.
(cd "$repo" && git ls-files -co --exclude-standard -z) | tr '\0' '\n' \
  | grep -v '^cna_agent/_gen/' | while IFS= read -r f; do [ -e "$repo/$f" ] && printf '%s\n' "$f"; done > "$work/files"

# The pure-Python dependencies the distributions lack (packaging/vendor.txt), as the exact wheels
# it names (hash-checked); both packages unpack them into /usr/lib/cna-agent/vendor. Only the
# download uses the repository's venv (tools/setup.sh makes it): nothing of it is packaged.
pip=("$repo/.venv/bin/python" -m pip)
[ -x "$repo/.venv/bin/python" ] || pip=(python3 -m pip)
timeout 300 "${pip[@]}" download --quiet --no-deps --only-binary=:all: --require-hashes \
  -r "$repo/packaging/vendor.txt" -d "$work/vendor-wheels" \
  || { echo "build-packages.sh: could not download the wheels in packaging/vendor.txt" >&2; exit 1; }

if [[ " $which " == *" deb "* ]]; then
  src="$work/deb/cna-agent"
  mkdir -p "$src"
  (cd "$repo" && tar -cf - -T "$work/files") | tar -xf - -C "$src"
  cp -r "$work/vendor-wheels" "$src/vendor-wheels"
  ln -s packaging/debian "$src/debian"  # dpkg-buildpackage wants ./debian
  (cd "$src" && timeout 900 dpkg-buildpackage -b -us -uc) > "$work/deb.log" 2>&1 \
    || { tail -50 "$work/deb.log" >&2; echo "build-packages.sh: dpkg-buildpackage failed" >&2; exit 1; }
  cp "$work"/deb/cna-agent*_"$version"_*.deb "$work"/deb/cna-agent_"$version"_*.changes \
     "$work"/deb/cna-agent_"$version"_*.buildinfo "$out"/
  echo "$(ls "$out"/cna-agent_"$version"_*.deb)"
fi

if [[ " $which " == *" rpm "* ]]; then
  top="$work/rpm"
  mkdir -p "$top/SOURCES"
  cp -r "$work/vendor-wheels" "$work/rpm-vendor-wheels"
  (cd "$repo" && tar -cf "$top/SOURCES/cna-agent-$version.tar" --transform "s,^,cna-agent-$version/," -T "$work/files")
  (cd "$work" && tar -rf "$top/SOURCES/cna-agent-$version.tar" --transform "s,^rpm-vendor-wheels,cna-agent-$version/vendor-wheels," rpm-vendor-wheels)
  gzip -n "$top/SOURCES/cna-agent-$version.tar"
  timeout 900 rpmbuild -bb --nodeps --define "_topdir $top" "$repo/packaging/rpm/cna-agent.spec" > "$work/rpm.log" 2>&1 \
    || { tail -50 "$work/rpm.log" >&2; echo "build-packages.sh: rpmbuild failed" >&2; exit 1; }
  cp "$top"/RPMS/*/cna-agent-"$version"-*.rpm "$out"/
  echo "$(ls "$out"/cna-agent-"$version"-*.rpm)"
fi
