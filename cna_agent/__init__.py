"""cna-agent: the compute node agent for KVM clouds."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# libvirt's embedded QEMU driver forks inside the agent process (virCommand) to start QEMU.
# gRPC core's fork support installs pthread_atfork handlers whose child side aborts the forked
# process ("epoll_wait error: Bad file descriptor"; QEMU "unexpected fatal signal 6") before it
# can exec. The agent never forks to run Python, so it turns gRPC's fork support off; this must
# happen before grpc is first imported, hence here, in the package's first module.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

# The .deb and the RPM ship the pure-Python dependencies their distributions do not package
# (packaging/vendor.txt: qemu.qmp, grpcio's health/reflection/status add-ons,
# googleapis-common-protos) in this directory. Appended, never prepended: a distribution package
# of the same module wins, and a venv or pip install (where the directory does not exist) is
# untouched.
_VENDOR = "/usr/lib/cna-agent/vendor"
if _os.path.isdir(_VENDOR) and _VENDOR not in _sys.path:
    _sys.path.append(_VENDOR)
