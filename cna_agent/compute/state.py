"""libvirt state + reason (+ job) -> the agent's VM state.

Why one table: events alone mislead (a reboot is STOPPED then STARTED, a failed migration
sends SUSPENDED_MIGRATED), so every consumer asks libvirt for the domain's current state and
reason and maps it here (DESIGN.md "Events").
"""

from __future__ import annotations

import libvirt

STOPPED, RUNNING, PAUSED, SHUTTING_DOWN, CRASHED, MIGRATING, SUSPENDED, STARTING, UNKNOWN = (
    "stopped", "running", "paused", "shutting_down", "crashed", "migrating", "suspended", "starting", "unknown",
)
#: Not a libvirt state: a shut-off domain whose RAM is saved on a datastore (hibernate.py),
#: known from the mark in its definition (inventory.py applies it).
HIBERNATED = "hibernated"
ALL_STATES = (STOPPED, RUNNING, PAUSED, SHUTTING_DOWN, CRASHED, MIGRATING, SUSPENDED, STARTING, UNKNOWN, HIBERNATED)

_PAUSED_REASONS = {
    libvirt.VIR_DOMAIN_PAUSED_UNKNOWN: "unknown", libvirt.VIR_DOMAIN_PAUSED_USER: "user",
    libvirt.VIR_DOMAIN_PAUSED_MIGRATION: "migration", libvirt.VIR_DOMAIN_PAUSED_SAVE: "save",
    libvirt.VIR_DOMAIN_PAUSED_DUMP: "dump", libvirt.VIR_DOMAIN_PAUSED_IOERROR: "ioerror",
    libvirt.VIR_DOMAIN_PAUSED_WATCHDOG: "watchdog", libvirt.VIR_DOMAIN_PAUSED_FROM_SNAPSHOT: "from_snapshot",
    libvirt.VIR_DOMAIN_PAUSED_SHUTTING_DOWN: "shutting_down", libvirt.VIR_DOMAIN_PAUSED_SNAPSHOT: "snapshot",
    libvirt.VIR_DOMAIN_PAUSED_CRASHED: "crashed", libvirt.VIR_DOMAIN_PAUSED_STARTING_UP: "starting_up",
    libvirt.VIR_DOMAIN_PAUSED_POSTCOPY: "postcopy", libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED: "postcopy_failed",
}
_RUNNING_REASONS = {
    libvirt.VIR_DOMAIN_RUNNING_UNKNOWN: "unknown", libvirt.VIR_DOMAIN_RUNNING_BOOTED: "booted",
    libvirt.VIR_DOMAIN_RUNNING_MIGRATED: "migrated", libvirt.VIR_DOMAIN_RUNNING_RESTORED: "restored",
    libvirt.VIR_DOMAIN_RUNNING_FROM_SNAPSHOT: "from_snapshot", libvirt.VIR_DOMAIN_RUNNING_UNPAUSED: "unpaused",
    libvirt.VIR_DOMAIN_RUNNING_MIGRATION_CANCELED: "migration_canceled", libvirt.VIR_DOMAIN_RUNNING_SAVE_CANCELED: "save_canceled",
    libvirt.VIR_DOMAIN_RUNNING_WAKEUP: "wakeup", libvirt.VIR_DOMAIN_RUNNING_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_RUNNING_POSTCOPY: "postcopy",
}
_SHUTOFF_REASONS = {
    libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN: "unknown", libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: "destroyed", libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED: "migrated", libvirt.VIR_DOMAIN_SHUTOFF_SAVED: "saved",
    libvirt.VIR_DOMAIN_SHUTOFF_FAILED: "failed", libvirt.VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT: "from_snapshot",
    libvirt.VIR_DOMAIN_SHUTOFF_DAEMON: "daemon",
}


def map_state(state: int, reason: int, job_type: int = 0) -> tuple[str, str]:
    """(agent state, reason text) for libvirt's (state, reason) and active job type."""
    migrating_job = job_type in (libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED)
    if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
        why = _RUNNING_REASONS.get(reason, "unknown")
        return (MIGRATING if why == "postcopy" else RUNNING), why
    if state == libvirt.VIR_DOMAIN_PAUSED:
        why = _PAUSED_REASONS.get(reason, "unknown")
        if why in ("migration", "postcopy", "postcopy_failed") or (why == "unknown" and migrating_job):
            return MIGRATING, why
        if why == "starting_up":
            return STARTING, why
        if why == "shutting_down":
            return SHUTTING_DOWN, why
        if why == "crashed":
            return CRASHED, why
        return PAUSED, why
    if state == libvirt.VIR_DOMAIN_SHUTDOWN:
        return SHUTTING_DOWN, "shutdown"
    if state == libvirt.VIR_DOMAIN_SHUTOFF:
        why = _SHUTOFF_REASONS.get(reason, "unknown")
        return (CRASHED if why in ("crashed", "failed") else STOPPED), why
    if state == libvirt.VIR_DOMAIN_CRASHED:
        return CRASHED, "panicked" if reason == libvirt.VIR_DOMAIN_CRASHED_PANICKED else "crashed"
    if state == libvirt.VIR_DOMAIN_PMSUSPENDED:
        return SUSPENDED, "pmsuspended"
    return UNKNOWN, "nostate"


LIFECYCLE_EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined", libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started", libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed", libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown", libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}
STOPPED_DETAILS = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shutdown", libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed", libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: "saved", libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT: "from_snapshot",
}
