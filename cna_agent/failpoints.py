"""Named crash points for the fault suite: ``CNA_FAILPOINTS=name[,name...]`` in the agent's
environment makes the process kill itself with SIGKILL when it reaches one of them.

Why: a kill -9 sent from outside lands wherever the process happens to be; the windows that
matter most (between "the destination prepared" and "libvirt's job started", between "the job
completed" and "the destination was told") last milliseconds and cannot be hit that way. A
failpoint is the same SIGKILL, delivered at a named step, so the suite can check recovery
from each of them every run (FoundationDB's and TiKV's fail points do the same). Nothing
happens unless the variable is set; it is read once, at import, so a running agent cannot be
made to crash by anything but its own start-up environment.

Besides the named steps inside a flow, the operation runner has two for every kind:
``<kind>:started`` (journalled as running, nothing done yet) and ``<kind>:done`` (the work
returned, its result not yet recorded): the two ends every recovery handler must tell apart.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

ENV = "CNA_FAILPOINTS"
_ARMED = frozenset(p.strip() for p in os.environ.get(ENV, "").split(",") if p.strip())


def armed() -> frozenset[str]:
    return _ARMED


def crash_point(name: str) -> None:
    """SIGKILL this process here when ``name`` is armed (no clean-up, no flushing: a real crash)."""
    if name in _ARMED:
        log.critical("event=failpoint.crash name=%s", name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
