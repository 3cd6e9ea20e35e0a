#!/usr/bin/env bash
# Set everything up (tools/setup.sh), build the test guests, and run the whole test suite
# (the suite brings up and tears down the daemons it needs: tools/testbed.py).
# Extra arguments go to pytest, e.g.  tools/run-tests.sh -m "not slow"  or  -k topology
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
"$repo/tools/setup.sh" || exit 1
py="$repo/.venv/bin/python"

# The daemons the integration tests need (libvirtd, Open vSwitch with the userspace datapath,
# tgtd) are brought up by the tests' session fixture through tools/testbed.py, in a private
# directory, and torn down after the run. They are not started here as well: two userspace
# (netdev) Open vSwitch instances on one host break each other.
if [ -x "$repo/tools/build-test-guest.py" ]; then
  for arch in x86_64 aarch64; do
    extra=()
    [ "$arch" = x86_64 ] && extra=(--boot-disk)  # root-disk tests (iSCSI LUN, vmdk import, linked clone)
    [ "$arch" = aarch64 ] && extra=(--efi-boot-disk)  # the aarch64 guest through AAVMF from its disk
    "$py" "$repo/tools/build-test-guest.py" --arch "$arch" "${extra[@]}" || echo "run-tests: building the $arch test guest failed" >&2
  done
fi

# The real Debian guest (tools/build-debian-guest.py, about 45 s, mostly downloads) is built in
# the background while the first tests run; the tests that boot it wait for it through the
# builder's own lock and cache.
# After it, the same job builds this tree's .deb and the node image with it installed (about
# 90 s) for tests/e2e/test_systemd_node_guest.py, which waits for $CNA_NODE_DEB_DIR/done and
# builds them itself when that says the build failed. The directory is this run's: a .deb left
# by an earlier run is never mistaken for this tree's.
debian_pid=
node_dir=
if [ -x "$repo/tools/build-debian-guest.py" ]; then
  mkdir -p "$repo/.cache"
  if command -v dpkg-buildpackage >/dev/null 2>&1; then
    node_dir="$(mktemp -d /tmp/cna-node-deb.XXXXXX)"
    export CNA_NODE_DEB_DIR="$node_dir"
  fi
  (
    "$py" "$repo/tools/build-debian-guest.py" --arch x86_64 > "$repo/.cache/build-debian-guest.log" 2>&1
    if [ -n "$node_dir" ]; then
      log="$repo/.cache/build-debian-node.log"
      env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 HOME="${HOME:-/root}" CNA_PACKAGES=deb \
        bash "$repo/tools/build-packages.sh" "$node_dir/out" > "$log" 2>&1 \
        && "$py" "$repo/tools/build-debian-guest.py" --arch x86_64 --node-deb "$node_dir"/out/cna-agent_*.deb >> "$log" 2>&1
      echo $? > "$node_dir/done"
    fi
  ) &
  debian_pid=$!
fi

"$repo/.venv/bin/pytest" -p no:cacheprovider "$@"
rc=$?
[ -n "$debian_pid" ] && wait "$debian_pid" 2>/dev/null
[ -n "$node_dir" ] && rm -rf "$node_dir"
# pytest exits 5 when it collected nothing: that is a failure of the suite, not a pass.
exit $rc
