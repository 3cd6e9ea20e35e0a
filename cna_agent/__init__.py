"""cna-agent: the compute node agent for KVM clouds."""

import os as _os

__version__ = "0.1.0"

# libvirt's embedded QEMU driver forks inside the agent process (virCommand) to start QEMU.
# gRPC core's fork support installs pthread_atfork handlers whose child side aborts the forked
# process ("epoll_wait error: Bad file descriptor"; QEMU "unexpected fatal signal 6") before it
# can exec. The agent never forks to run Python, so it turns gRPC's fork support off; this must
# happen before grpc is first imported, hence here, in the package's first module.
_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
