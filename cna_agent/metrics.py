"""Prometheus metrics: host, VMs and the agent itself, off by default, loopback by default.

Names follow the libvirt exporters where they overlap (``libvirt_domain_block_stats_read_bytes_total``,
``libvirt_domain_vcpu_current``...), with ``domain`` and ``uuid`` labels, so existing
dashboards work; the rest use the ``cna_`` prefix and Prometheus base units.

Nothing is sampled on scrape: VM and host figures come from the stats sampler's latest
snapshot (one bulk libvirt call per interval), so a scraper cannot multiply libvirt calls.
Agent-internal figures are read at scrape time from the objects that own them (link status,
event log, operation journal, the blocking pools' busy/queued/stuck counts). RPC counts and latencies are recorded by :func:`rpc_on_call`,
the AgentServer's ``on_call`` hook.

The endpoint is prometheus_client's HTTP server in its own thread, so a slow scraper never
touches the event loop; everything it reads is either an immutable snapshot or a short
SQLite query under the store's lock.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

#: RPC metrics live in one process-wide registry so the server hook needs no wiring order.
RPC_REGISTRY = CollectorRegistry(auto_describe=True)
RPC_REQUESTS = Counter("cna_agent_rpc_requests", "gRPC calls served, by method and status code",
                       ["method", "code"], registry=RPC_REGISTRY)
RPC_DURATION = Histogram("cna_agent_rpc_duration_seconds", "gRPC call latency by method", ["method"],
                         buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
                         registry=RPC_REGISTRY)


def rpc_on_call(method: str, code: str, seconds: float) -> None:
    """AgentServer(on_call=...) hook: one unary call finished."""
    RPC_REQUESTS.labels(method, code).inc()
    RPC_DURATION.labels(method).observe(seconds)


_LINK_STATES = ("disabled", "disconnected", "connecting", "connected")


class AgentCollector(Collector):
    """Reads host/VM/agent figures at scrape time from their owners."""

    def __init__(self, *, sampler: Any = None, link: Any = None, store: Any = None, events: Any = None,
                 pools: Iterable[Any] = ()) -> None:
        self._sampler = sampler
        self._link = link
        self._store = store
        self._events = events
        #: The agent's BlockingPools (AgentContext.pools, a live list), read at scrape time.
        self._pools = pools

    def collect(self) -> Iterable[Any]:
        for produce in (self._vm_metrics, self._host_metrics, self._agent_metrics, self._pool_metrics):
            try:
                yield from produce()
            except Exception:  # a broken family must not take the whole scrape down
                log.exception("event=metrics.collect_failed part=%s", produce.__name__)

    # -- VMs ---------------------------------------------------------------------------------

    def _vm_metrics(self) -> Iterable[Any]:
        snap = self._sampler.latest if self._sampler is not None else None
        if snap is None:
            return
        dom = ["domain", "uuid"]

        def g(name: str, doc: str, labels: list[str] = dom) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels)

        def c(name: str, doc: str, labels: list[str] = dom) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=labels)

        up = g("libvirt_domain_info_state", "VM state (1 for the current state)", dom + ["state"])
        cpu = c("libvirt_domain_info_cpu_time_seconds", "Guest CPU time")
        cpu_pct = g("cna_vm_cpu_percent", "Guest CPU use over the last stats interval, percent of one host CPU")
        vcur = g("libvirt_domain_vcpu_current", "Current number of online vCPUs")
        vmax = g("libvirt_domain_vcpu_maximum", "Maximum number of vCPUs")
        vtime = c("libvirt_domain_vcpu_time_seconds", "vCPU time", dom + ["vcpu"])
        vstate = g("libvirt_domain_vcpu_state", "vCPU state (0 offline, 1 running, 2 blocked)", dom + ["vcpu"])
        bal = g("libvirt_domain_balloon_current_bytes", "Current balloon size (guest memory)")
        balmax = g("libvirt_domain_balloon_maximum_bytes", "Maximum balloon size")
        rss = g("libvirt_domain_memory_stats_rss_bytes", "QEMU resident set size")
        unused = g("libvirt_domain_memory_stats_unused_bytes", "Memory the guest leaves unused (balloon driver)")
        avail = g("libvirt_domain_memory_stats_available_bytes", "Memory the guest can use (balloon driver)")
        blk = dom + ["target_device", "source_file"]
        rd = c("libvirt_domain_block_stats_read_bytes", "Bytes read", blk)
        wr = c("libvirt_domain_block_stats_write_bytes", "Bytes written", blk)
        rdr = c("libvirt_domain_block_stats_read_requests", "Read requests", blk)
        wrr = c("libvirt_domain_block_stats_write_requests", "Write requests", blk)
        flr = c("libvirt_domain_block_stats_flush_requests", "Flush requests", blk)
        rdt = c("libvirt_domain_block_stats_read_time_seconds", "Time spent reading", blk)
        wrt = c("libvirt_domain_block_stats_write_time_seconds", "Time spent writing", blk)
        cap = g("libvirt_domain_block_stats_capacity_bytes", "Disk capacity", blk)
        alloc = g("libvirt_domain_block_stats_allocation_bytes", "Disk allocation", blk)
        nic = dom + ["target_device"]
        rxb = c("libvirt_domain_interface_stats_receive_bytes", "Bytes received", nic)
        txb = c("libvirt_domain_interface_stats_transmit_bytes", "Bytes sent", nic)
        rxp = c("libvirt_domain_interface_stats_receive_packets", "Packets received", nic)
        txp = c("libvirt_domain_interface_stats_transmit_packets", "Packets sent", nic)
        rxe = c("libvirt_domain_interface_stats_receive_errors", "Receive errors", nic)
        txe = c("libvirt_domain_interface_stats_transmit_errors", "Transmit errors", nic)
        rxd = c("libvirt_domain_interface_stats_receive_drops", "Receive drops", nic)
        txd = c("libvirt_domain_interface_stats_transmit_drops", "Transmit drops", nic)
        for vm in snap.vms:
            lv = [vm.name, vm.uuid]
            up.add_metric(lv + [vm.state], 1)
            cpu.add_metric(lv, vm.cpu_time_ns / 1e9)
            cpu_pct.add_metric(lv, vm.cpu_percent)
            vcur.add_metric(lv, vm.vcpus_current)
            vmax.add_metric(lv, vm.vcpus_maximum)
            for v in vm.vcpus:
                vtime.add_metric(lv + [str(v.id)], v.time_ns / 1e9)
                vstate.add_metric(lv + [str(v.id)], v.state)
            bal.add_metric(lv, vm.balloon_current_kib * 1024)
            balmax.add_metric(lv, vm.balloon_maximum_kib * 1024)
            rss.add_metric(lv, vm.rss_kib * 1024)
            unused.add_metric(lv, vm.unused_kib * 1024)
            avail.add_metric(lv, vm.available_kib * 1024)
            for d in vm.disks:
                ld = lv + [d.name, d.path]
                rd.add_metric(ld, d.read_bytes)
                wr.add_metric(ld, d.write_bytes)
                rdr.add_metric(ld, d.read_requests)
                wrr.add_metric(ld, d.write_requests)
                flr.add_metric(ld, d.flush_requests)
                rdt.add_metric(ld, d.read_time_ns / 1e9)
                wrt.add_metric(ld, d.write_time_ns / 1e9)
                cap.add_metric(ld, d.capacity_bytes)
                alloc.add_metric(ld, d.allocation_bytes)
            for n in vm.nics:
                ln = lv + [n.name]
                rxb.add_metric(ln, n.rx_bytes)
                txb.add_metric(ln, n.tx_bytes)
                rxp.add_metric(ln, n.rx_packets)
                txp.add_metric(ln, n.tx_packets)
                rxe.add_metric(ln, n.rx_errors)
                txe.add_metric(ln, n.tx_errors)
                rxd.add_metric(ln, n.rx_dropped)
                txd.add_metric(ln, n.tx_dropped)
        yield from (up, cpu, cpu_pct, vcur, vmax, vtime, vstate, bal, balmax, rss, unused, avail,
                    rd, wr, rdr, wrr, flr, rdt, wrt, cap, alloc, rxb, txb, rxp, txp, rxe, txe, rxd, txd)
        n_vms = GaugeMetricFamily("cna_vms", "VMs in the latest stats sample")
        n_vms.add_metric([], len(snap.vms))
        yield n_vms
        took = GaugeMetricFamily("cna_agent_stats_sample_seconds", "Wall time of the latest bulk stats call")
        took.add_metric([], snap.call_s)
        yield took
        cpu_s = GaugeMetricFamily("cna_agent_stats_sample_cpu_seconds", "Agent CPU time spent on the latest sample")
        cpu_s.add_metric([], snap.cpu_s)
        yield cpu_s

    # -- host --------------------------------------------------------------------------------

    def _host_metrics(self) -> Iterable[Any]:
        st = getattr(self._sampler, "latest_host", None) if self._sampler is not None else None
        if st is None:
            return
        items: list[tuple[str, str, float]] = [
            ("cna_host_cpu_busy_percent", "Host CPU busy over the last interval, percent", st.cpu.percent),
            ("cna_host_cpu_iowait_percent", "Host CPU iowait over the last interval, percent", st.cpu.iowait),
            ("cna_host_cpu_steal_percent", "Host CPU steal over the last interval, percent", st.cpu.steal),
            ("cna_host_cpus", "Logical CPUs", st.logical_cpus),
            ("cna_host_memory_total_bytes", "Host memory", st.memory["total"]),
            ("cna_host_memory_available_bytes", "Host memory available", st.memory["available"]),
            ("cna_host_load1", "1-minute load average", st.load[0]),
            ("cna_host_load5", "5-minute load average", st.load[1]),
            ("cna_host_load15", "15-minute load average", st.load[2]),
            ("cna_host_vms_running", "VMs running", st.vms_running),
            ("cna_host_vms_defined", "VMs the hypervisor knows", st.vms_total),
            ("cna_host_hypervisor_up", "1 when libvirt answers", 1 if st.hypervisor_connected else 0),
        ]
        for name, doc, value in items:
            fam = GaugeMetricFamily(name, doc)
            fam.add_metric([], value)
            yield fam

    # -- the agent ---------------------------------------------------------------------------

    def _agent_metrics(self) -> Iterable[Any]:
        if self._store is not None:
            row = self._store.query("SELECT COUNT(*) AS n, SUM(end_time IS NULL) AS active FROM operations")[0]
            ops = GaugeMetricFamily("cna_agent_journal_operations", "Operations kept in the journal")
            ops.add_metric([], row["n"] or 0)
            yield ops
            active = GaugeMetricFamily("cna_agent_operations_active", "Operations not finished")
            active.add_metric([], row["active"] or 0)
            yield active
        if self._events is not None:
            seq = GaugeMetricFamily("cna_agent_event_last_sequence", "Newest sequence in the event log")
            seq.add_metric([], self._events.log.last_sequence())
            yield seq
        if self._sampler is not None:
            errs = CounterMetricFamily("cna_agent_stats_sample_failures", "Stats samples that failed")
            errs.add_metric([], self._sampler.errors)
            yield errs
        if self._link is not None:
            st = self._link.status()
            state = GaugeMetricFamily("cna_agent_vrm_link_state", "VRM link state (1 for the current one)", labels=["state"])
            for name in _LINK_STATES:
                state.add_metric([name], 1 if st.state == name else 0)
            yield state
            for name, doc, value in (
                ("cna_agent_vrm_acked_sequence", "Last event sequence the VRM acknowledged", st.acked_sequence),
                ("cna_agent_vrm_backlog_events", "Events the VRM has not acknowledged", st.backlog),
            ):
                fam = GaugeMetricFamily(name, doc)
                fam.add_metric([], value)
                yield fam
            for name, doc, value in (
                ("cna_agent_vrm_connects", "Streams opened to the VRM", st.connects),
                ("cna_agent_vrm_failures", "Failed VRM attempts and dropped streams", st.failures),
                ("cna_agent_vrm_events_sent", "Events sent to the VRM (resends included)", st.events_sent),
                ("cna_agent_vrm_heartbeats_sent", "Heartbeats sent to the VRM", st.heartbeats_sent),
            ):
                fam = CounterMetricFamily(name, doc)
                fam.add_metric([], value)
                yield fam


    def _pool_metrics(self) -> Iterable[Any]:
        stats = [p.stats() for p in list(self._pools)]
        if not stats:
            return
        label = ["pool"]
        size = GaugeMetricFamily("cna_agent_blocking_pool_threads", "Threads of a blocking-work pool", labels=label)
        busy = GaugeMetricFamily("cna_agent_blocking_pool_busy", "Threads running a call now (stuck ones included)", labels=label)
        queued = GaugeMetricFamily("cna_agent_blocking_pool_queued", "Calls waiting for a thread", labels=label)
        stuck = GaugeMetricFamily("cna_agent_blocking_pool_stuck",
                                  "Calls still running past their deadline (their caller got DEADLINE_EXCEEDED)", labels=label)
        late = CounterMetricFamily("cna_agent_blocking_pool_deadline_exceeded",
                                   "Calls whose caller got DEADLINE_EXCEEDED", labels=label)
        for s in stats:
            size.add_metric([s.name], s.size)
            busy.add_metric([s.name], s.busy)
            queued.add_metric([s.name], s.queued)
            stuck.add_metric([s.name], s.stuck)
            late.add_metric([s.name], s.deadlines_exceeded)
        yield from (size, busy, queued, stuck, late)


class _RegistryProxy(Collector):
    """Exposes another registry's metrics (the RPC ones) through this endpoint's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Any]:
        return self._registry.collect()


def build_registry(collector: AgentCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    registry.register(_RegistryProxy(RPC_REGISTRY))
    return registry


class MetricsEndpoint:
    """prometheus_client's HTTP server on ``host:port`` in a thread."""

    def __init__(self, listen: str, registry: CollectorRegistry) -> None:
        """``listen`` is "host:port" as validated by config (port 0 = any free port, for tests)."""
        host, _, port = listen.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self._registry = registry
        self._server: Any = None
        self._thread: Any = None

    def start(self) -> None:
        from prometheus_client import start_http_server

        result = start_http_server(self.port, addr=self.host, registry=self._registry)
        if isinstance(result, tuple):  # prometheus_client >= 0.20 returns (server, thread)
            self._server, self._thread = result
            self.port = self._server.server_address[1]
        log.info("event=metrics.listening address=%s:%d", self.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def metric_names(registry: CollectorRegistry) -> list[str]:
    """Every family name the registry would expose now (tests, debugging)."""
    return sorted({m.name for m in registry.collect()})

