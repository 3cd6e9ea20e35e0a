"""A test guest that dirties memory faster than a migration stream can send it, and a sampler
of libvirt's migration job seen from outside the agent.

Why: a migration that never converges is the failure every anchor's tracker shows; to prove the
agent's default policy converges where a plain pre-copy does not, the guest has to rewrite its
memory faster than the bandwidth the test allows. The busybox test guest (tools/build-test-guest.py)
has no /dev/shm, so one is mounted from its root shell; the data must be non-zero (QEMU sends
zero pages almost for free), so a 1 MiB random seed is repeated, and then one ``dd`` per pass
rewrites the whole file in place (QEMU's dirty log counts writes, not changed contents). Every
``DIRTY_EVERY`` passes the loop prints ``CNA-DIRTY <n>`` on the serial console, so the guest's
rewrite rate can be read from the host and the loop is seen to keep going after a move.

:class:`JobSampler` reads the job on the source's libvirt (jobStats, max downtime) in a thread
while the agent drives it: the dirty rate, iterations, remaining data and auto-converge's CPU
throttle, as libvirt reports them, not as the agent says.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

#: The loop prints a line every this many rewrite passes.
DIRTY_EVERY = 20


def start_dirtying(shell, log, mib: int = 64, timeout: float = 120.0) -> float:
    """Mount a tmpfs on /dev/shm in the guest behind ``shell`` (support.console._Shell), fill
    ``mib`` MiB of non-zero data and start rewriting it in a background loop; ``log`` is the
    guest's serial log (SerialLog). Returns the guest's rewrite rate in MiB/s, measured from the
    CNA-DIRTY lines over a few seconds (the loop runs on when this returns)."""
    code, out = shell.run(f"mkdir -p /dev/shm && mount -t tmpfs -o size={mib + 16}m tmpfs /dev/shm && "
                          "dd if=/dev/urandom of=/dev/shm/seed bs=1M count=1 2>/dev/null && "
                          f"i=0; while [ $i -lt {mib} ]; do cat /dev/shm/seed; i=$((i+1)); done > /dev/shm/data; "
                          "stat -c %s /dev/shm/data", timeout=timeout)
    assert code == 0 and out.split()[-1:] == [str(mib << 20)], (code, out)
    # not through run(): a command ending in '&' cannot be followed by '; echo'
    shell.send("(n=0; while :; do dd if=/dev/shm/data of=/dev/shm/data bs=1M conv=notrunc 2>/dev/null; "
               f"n=$((n+1)); [ $((n % {DIRTY_EVERY})) -eq 0 ] && echo CNA-DIRTY $n; done) &\n")
    log.wait_for(r"^CNA-DIRTY \d+", timeout=60, count=2)
    first, t0 = log.count(r"^CNA-DIRTY \d+"), time.monotonic()
    log.wait_for(r"^CNA-DIRTY \d+", timeout=60, count=first + 3)
    lines = log.count(r"^CNA-DIRTY \d+") - first
    return lines * DIRTY_EVERY * mib / (time.monotonic() - t0)


class DomainSampler:
    """Reads domain ``uuid`` on the libvirt at ``uri`` every ``interval`` seconds in a thread
    until stopped (a context manager); subclasses say what one sample is."""

    def __init__(self, uri: str, uuid: str, interval: float = 0.5) -> None:
        self.uri, self.uuid, self.interval = uri, uuid, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sampler:{uuid}", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def sample(self, dom) -> None:
        raise NotImplementedError

    def opened(self, conn) -> None:
        """Called once with the sampler's connection before the first sample."""

    def _run(self) -> None:
        import libvirt

        conn = libvirt.open(self.uri)
        try:
            self.opened(conn)
            while not self._stop.wait(self.interval):
                try:
                    self.sample(conn.lookupByUUIDString(self.uuid))
                except libvirt.libvirtError:
                    continue  # between phases, or the domain left this host
        finally:
            conn.close()


class StateSampler(DomainSampler):
    """The domain's (state, reason) pairs seen, e.g. paused for post-copy while it moves, and
    libvirt's lifecycle events for it as (event, detail): a phase shorter than the sampling
    interval still shows as its event (virDomainEventType, e.g. suspended for post-copy)."""

    def __init__(self, uri: str, uuid: str, interval: float = 0.2) -> None:
        super().__init__(uri, uuid, interval)
        self.seen: set[tuple[int, int]] = set()
        self.events: list[tuple[int, int]] = []
        self._ready = threading.Event()

    def __enter__(self):
        from support.libvirt import start_event_loop

        start_event_loop()  # before the connection opens, or it gets no events
        super().__enter__()
        self._ready.wait(timeout=10)
        return self

    def opened(self, conn) -> None:
        import libvirt

        def lifecycle(_conn, dom, event, detail, _opaque) -> None:
            if dom.UUIDString() == self.uuid:
                self.events.append((event, detail))

        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None)
        self._ready.set()

    def sample(self, dom) -> None:
        self.seen.add(tuple(dom.state()))


class JobSampler(DomainSampler):
    """Samples the migration job of the domain; keeps every sample (peaks and the last)."""

    def __init__(self, uri: str, uuid: str, interval: float = 0.5) -> None:
        super().__init__(uri, uuid, interval)
        self.samples: list[dict] = []

    def sample(self, dom) -> None:
        import libvirt

        stats = dom.jobStats(0)
        if stats.get("type", 0) == libvirt.VIR_DOMAIN_JOB_NONE:
            return
        stats["max_downtime_ms"] = dom.migrateGetMaxDowntime(0)
        stats["t"] = time.monotonic()
        self.samples.append(stats)

    def peak(self, key: str) -> int:
        return max((int(s.get(key, 0) or 0) for s in self.samples), default=0)

    def figures(self) -> dict:
        """The peaks: dirty rate (MiB/s; libvirt reports pages/s), iteration, CPU throttle (%),
        the max downtime the source's QEMU was set to (ms), and the bandwidth (MiB/s)."""
        page = self.peak("memory_page_size") or 4096
        return {"dirty_mib_s": round(self.peak("memory_dirty_rate") * page / (1 << 20), 1),
                "iterations": self.peak("memory_iteration"),
                "throttle_pct": self.peak("auto_converge_throttle"),
                "max_downtime_ms": self.peak("max_downtime_ms"),
                "bps_mib_s": round(self.peak("memory_bps") / (1 << 20), 1),
                "samples": len(self.samples)}


#: The convergence check's stream cap and the working set the guest rewrites: every iteration
#: finds the whole set dirty again, more than the stream sends within even the largest downtime
#: the agent steps up to (300 ms x 1.5^4 = 1.5 s; x 32 MiB/s = 48 MiB < 64 MiB).
BANDWIDTH_MIB_S = 32
WORKING_SET_MIB = 64
#: The plain pre-copy's completion timeout (s per GiB; a 256 MiB guest counts as 1 GiB): about ten
#: iterations at 2 s each (64 MiB at 32 MiB/s) and every downtime step fit in it.
PLAIN_COMPLETION_S = 20


@dataclass
class Convergence:
    """What the convergence check saw, from outside the agents (see :func:`check_convergence`)."""

    rewrite_mib_s: float = 0.0
    plain_s: float = 0.0
    plain_error: tuple[int, str] = (0, "")
    plain: dict = field(default_factory=dict)
    after_plain: tuple = ()
    dirtying_on_source: bool = False
    default_s: float = 0.0
    default_state: int = 0
    default_error: str = ""
    default: dict = field(default_factory=dict)
    after_default: tuple = ()
    completed: dict = field(default_factory=dict)
    loop_on_destination: bool = False
    booted_on_destination: bool = False
    shell_on_destination: tuple[int, str] = (-1, "")

    @property
    def converged(self) -> bool:
        """The plain pre-copy timed out leaving the VM on the source, the default policy moved it
        (running and persistent on the destination, gone from the source, its loop running on)."""
        import grpc

        from cna_agent.api import pb

        return (self.plain_error[0] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
                and self.after_plain == ((True, True), None) and self.dirtying_on_source
                and self.default_state == pb.operations_pb2.OPERATION_STATE_SUCCEEDED
                and self.after_default == (None, (True, True)) and self.loop_on_destination
                and not self.booted_on_destination and self.shell_on_destination[0] == 0)


def check_convergence(src_agent, dst_agent, src_host, dst_host, uuid: str) -> Convergence:
    """Make running VM ``uuid`` (a test guest with a serial console, on ``src_agent``'s host) dirty
    WORKING_SET_MIB fast, then migrate it to ``dst_agent`` twice at BANDWIDTH_MIB_S: first a plain
    pre-copy (auto-converge off, no post-copy, the default downtime schedule), which must time
    out, then under the default policy (only the bandwidth set). Records what libvirt, the
    hosts and the guest showed; asserts nothing (callers judge)."""
    from cna_agent.api import pb
    from support.console import AgentConsole
    from support.guests import serial_log
    from support.hosts import domain_state
    from support.operations import history, wait

    vm = pb.vm_pb2
    r = Convergence()
    log_src = serial_log(src_agent, uuid)
    dest = f"127.0.0.1:{dst_agent.tcp_port}"
    with src_agent.channel() as chs, dst_agent.channel() as chd:
        stub = pb.vm_pb2_grpc.VmServiceStub(chs)
        with AgentConsole(chs, uuid) as con:
            con.send("\n")
            con.wait_for(r"cna# ", timeout=30, partial=True)
            r.rewrite_mib_s = round(start_dirtying(con, log_src, WORKING_SET_MIB), 1)

        t0 = time.monotonic()
        with JobSampler(src_host.uri, uuid) as plain:
            op = stub.MigrateVm(vm.MigrateVmRequest(vm=uuid, destination=dest, policy=vm.MigrationPolicy(
                bandwidth_mib_s=BANDWIDTH_MIB_S, auto_converge=False, completion_timeout_s_per_gib=PLAIN_COMPLETION_S)),
                timeout=60)
            failed = wait(chs, op, timeout=PLAIN_COMPLETION_S + 90)
        r.plain_s, r.plain = round(time.monotonic() - t0, 1), plain.figures()
        r.plain_error = (failed.error.code, failed.error.message)
        deadline = time.monotonic() + 30  # a failed move leaves the destination clean within 30 s
        while time.monotonic() < deadline and domain_state(dst_host.uri, uuid) is not None:
            time.sleep(0.5)
        r.after_plain = (domain_state(src_host.uri, uuid), domain_state(dst_host.uri, uuid))
        passes = log_src.count(r"^CNA-DIRTY \d+")
        try:
            log_src.wait_for(r"^CNA-DIRTY \d+", timeout=30, count=passes + 1)
            r.dirtying_on_source = True
        except AssertionError:
            pass

        t0 = time.monotonic()
        with JobSampler(src_host.uri, uuid) as conv:
            op = stub.MigrateVm(vm.MigrateVmRequest(vm=uuid, destination=dest,
                                                    policy=vm.MigrationPolicy(bandwidth_mib_s=BANDWIDTH_MIB_S)), timeout=60)
            last = history(chs, op, timeout=300)[-1]
        r.default_s, r.default = round(time.monotonic() - t0, 1), conv.figures()
        r.default_state, r.default_error = last.state, last.error.message
        r.after_default = (domain_state(src_host.uri, uuid), domain_state(dst_host.uri, uuid))
        if r.after_default[1]:
            r.completed = completed_job(dst_host.uri, uuid)
            log_dst = serial_log(dst_agent, uuid)
            try:
                log_dst.wait_for(r"^CNA-DIRTY \d+", timeout=60, count=2)  # the same loop, moved
                r.loop_on_destination = True
            except AssertionError:
                pass
            r.booted_on_destination = "CNA-GUEST-READY" in log_dst.text()
            # stat, not wc -c: busybox's wc reads the file a byte at a time (0.4 s of CPU for
            # 64 MiB natively), which under TCG, beside the rewrite loop on a loaded CI host,
            # took over 60 s; the loop's passes on B already show the data pages are read there.
            with AgentConsole(chd, uuid) as con:
                r.shell_on_destination = con.run("stat -c %s /dev/shm/data", timeout=60)
    return r


def completed_job(uri: str, uuid: str) -> dict:
    """The completed migration job's figures on the libvirt at ``uri`` (what ``virsh domjobinfo
    --completed --keep-completed`` shows): elapsed and downtime in ms, iterations, throttle."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        stats = conn.lookupByUUIDString(uuid).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED
                                                       | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED)
    except libvirt.libvirtError:
        return {}
    finally:
        conn.close()
    return {k: stats[k] for k in ("time_elapsed", "downtime", "memory_iteration", "auto_converge_throttle") if k in stats}
