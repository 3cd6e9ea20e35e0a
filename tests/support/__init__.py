"""Helpers every test tier shares (unit, integration, e2e), one small module per thing they drive.

Why a package: tests used to reach helpers through ``sys.path`` inserts and by importing other
test modules (``from test_vm_lifecycle import ok``), so moving or renaming one test broke others
and pytest collected helpers twice. Now no test imports another test module: what several test
modules need lives here, and pyproject's ``[tool.pytest.ini_options] pythonpath = ["tests"]``
makes ``from support.agent import start_agent`` work from every tier, conftest.py included.
Fixtures built on these helpers live in the conftest.py files (tests/conftest.py for the ones
several tiers use), not here.

  agent       the real ``cna-agent serve`` process: config, start, readiness, its leftover guests
  operations  waiting for an Operation to finish (watch or poll) and ``ok`` (it succeeded)
  guests      the test guests tools/build-test-guest.py builds, and specs / domain XML booting them
  console     reading a guest's serial console and typing into its shell
  libvirt     the embedded driver's event loop and capabilities cache; the host's libvirtd
  waiting     polling a condition until a deadline
  tools       the repository's tools/ scripts, loaded by path
  san         recorded SCSI sysfs/devfs trees (tests/fixtures/scsi) and their datastores
  procs       child processes with QEMU-named threads, and their affinity as /proc shows it
  placement   hypothesis strategies for host topologies and VM mixes
  stats       libvirt bulk-stats records shaped like QEMU's
  vrm         tools/vrm-sim as a child process, and the agent's view of its link
  pki         certificates made with openssl for TLS tests
"""
