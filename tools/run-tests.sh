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
debian_pid=
if [ -x "$repo/tools/build-debian-guest.py" ]; then
  mkdir -p "$repo/.cache"
  "$py" "$repo/tools/build-debian-guest.py" --arch x86_64 > "$repo/.cache/build-debian-guest.log" 2>&1 &
  debian_pid=$!
fi

"$repo/.venv/bin/pytest" -p no:cacheprovider "$@"
rc=$?
[ -n "$debian_pid" ] && wait "$debian_pid" 2>/dev/null
# pytest exits 5 when it collected nothing: that is a failure of the suite, not a pass.
exit $rc
