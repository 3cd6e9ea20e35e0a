#!/usr/bin/env bash
# Set everything up (tools/setup.sh), bring up the daemons the integration tests use
# (tools/testbed.py: libvirtd, Open vSwitch with the userspace datapath, tgtd), build the
# test guests, run the whole test suite, and tear the daemons down again.
# Extra arguments go to pytest, e.g.  tools/run-tests.sh -m "not slow"  or  -k topology
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
"$repo/tools/setup.sh" || exit 1
py="$repo/.venv/bin/python"

testbed_up=0
if [ -x "$repo/tools/testbed.py" ]; then
  if "$py" "$repo/tools/testbed.py" up; then
    testbed_up=1
    set -a
    # shellcheck disable=SC1090
    eval "$("$py" "$repo/tools/testbed.py" env)"
    set +a
  else
    echo "run-tests: the testbed did not come up; tests that need it will fail" >&2
  fi
fi
if [ -x "$repo/tools/build-test-guest.py" ]; then
  for arch in x86_64 aarch64; do
    "$py" "$repo/tools/build-test-guest.py" --arch "$arch" || echo "run-tests: building the $arch test guest failed" >&2
  done
fi

"$repo/.venv/bin/pytest" -p no:cacheprovider "$@"
rc=$?
if [ "$testbed_up" = 1 ]; then
  "$py" "$repo/tools/testbed.py" down || true
fi
# pytest exits 5 when it collected nothing: that is a failure of the suite, not a pass.
exit $rc
