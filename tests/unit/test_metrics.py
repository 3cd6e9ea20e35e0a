"""The Prometheus endpoint, scraped over HTTP and parsed with prometheus_client's text parser.

The collector reads a real StateStore/EventHub and a stats snapshot parsed from bulk-stats
dicts; the HTTP server is the real prometheus_client one on a loopback port. The real agent's
endpoint is scraped in tests/e2e/test_vrm_link.py.
"""

from __future__ import annotations

import asyncio
import urllib.request
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from cna_agent.metrics import AgentCollector, MetricsEndpoint, build_registry, rpc_on_call
from cna_agent.state.eventlog import EventHub, EventLog
from cna_agent.state.store import StateStore
from cna_agent.vrm.link import LinkStatus
from cna_agent.vrm.stats import StatsSnapshot, parse_record
from support.stats import qemu_like


class FakeLink:
    def status(self) -> LinkStatus:
        return LinkStatus(state="connected", address="127.0.0.1:1", last_sequence=12, acked_sequence=9, connects=2, failures=1)


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_scrape_parses_with_libvirt_exporter_names_and_agent_metrics(tmp_path):
    store = StateStore(tmp_path / "agent.db")
    hub = EventHub(store, EventLog(store))
    for i in range(3):
        asyncio.run(hub.publish("test.event", message=str(i)))
    a = parse_record("u-1", "web1", qemu_like(10, 1000, 2000, 300, 400), None, 0)
    b = parse_record("u-1", "web1", qemu_like(12, 5096, 2000, 1300, 400), a, 2.0)
    host = SimpleNamespace(cpu=SimpleNamespace(percent=12.5, iowait=1.0, steal=0.0), logical_cpus=2,
                           memory={"total": 8 << 30, "available": 4 << 30}, load=(0.5, 0.4, 0.3),
                           vms_running=1, vms_total=1, hypervisor_connected=True)
    sampler = SimpleNamespace(latest=StatsSnapshot(time=0, monotonic=0, interval_s=2.0, vms=(b,), call_s=0.01, cpu_s=0.002),
                              latest_host=host, errors=0)
    rpc_on_call("/cna.v1.VmService/ListVms", "OK", 0.003)
    rpc_on_call("/cna.v1.VmService/ListVms", "OK", 0.2)
    rpc_on_call("/cna.v1.VmService/GetVm", "NOT_FOUND", 0.001)
    endpoint = MetricsEndpoint("127.0.0.1:0", build_registry(AgentCollector(sampler=sampler, link=FakeLink(), store=store, events=hub)))
    endpoint.start()
    try:
        fam = scrape(endpoint.port)
    finally:
        endpoint.stop()
        store.close()

    def value(name: str, **labels) -> float:
        for s in fam[name].samples:
            if all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
        raise AssertionError(f"{name}{labels} not in {fam[name].samples}")

    assert value("libvirt_domain_block_stats_read_bytes", domain="web1", uuid="u-1", target_device="vda") == 5096
    assert fam["libvirt_domain_block_stats_read_bytes"].samples[0].name == "libvirt_domain_block_stats_read_bytes_total"
    assert value("libvirt_domain_interface_stats_receive_bytes", target_device="vnet0") == 1300
    assert value("libvirt_domain_vcpu_current", domain="web1") == 2
    assert value("libvirt_domain_vcpu_time_seconds", vcpu="1") == 6.0
    assert value("libvirt_domain_info_state", state="running") == 1
    assert value("cna_vm_cpu_percent", uuid="u-1") == 100.0  # 2 s CPU in 2 s
    assert value("cna_host_cpu_busy_percent") == 12.5
    assert value("cna_agent_event_last_sequence") == 3
    assert value("cna_agent_journal_operations") == 0
    assert value("cna_agent_vrm_link_state", state="connected") == 1
    assert value("cna_agent_vrm_link_state", state="disconnected") == 0
    assert value("cna_agent_vrm_backlog_events") == 3
    assert value("cna_agent_vrm_failures") == 1
    assert value("cna_agent_rpc_requests", method="/cna.v1.VmService/ListVms", code="OK") >= 2
    assert value("cna_agent_rpc_requests", method="/cna.v1.VmService/GetVm", code="NOT_FOUND") >= 1
    buckets = [s for s in fam["cna_agent_rpc_duration_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["method"] == "/cna.v1.VmService/ListVms"]
    assert {s.labels["le"]: s.value for s in buckets}["0.005"] >= 1


def test_no_snapshot_yet_still_scrapes(tmp_path):
    store = StateStore(tmp_path / "agent.db")
    hub = EventHub(store, EventLog(store))
    sampler = SimpleNamespace(latest=None, latest_host=None, errors=2)
    endpoint = MetricsEndpoint("127.0.0.1:0", build_registry(AgentCollector(sampler=sampler, store=store, events=hub)))
    endpoint.start()
    try:
        fam = scrape(endpoint.port)
    finally:
        endpoint.stop()
        store.close()
    assert "libvirt_domain_info_state" not in fam
    assert fam["cna_agent_stats_sample_failures"].samples[0].value == 2


def test_blocking_pools_busy_queued_and_stuck(tmp_path):
    import threading

    from cna_agent.blocking import BlockingPool
    from cna_agent.errors import DeadlineExceeded

    libvirt_pool, sqlite_pool = BlockingPool("libvirt", 2, 30), BlockingPool("sqlite", 1, 30)
    release = threading.Event()

    async def wedge() -> None:
        # One libvirt call stuck past its deadline, one still within it.
        loop = asyncio.get_running_loop()
        loop.create_task(libvirt_pool.run(lambda: release.wait(10)))
        try:
            await libvirt_pool.run(lambda: release.wait(10), timeout=0.1, what="domain lookup")
        except DeadlineExceeded:
            pass

    endpoint = MetricsEndpoint("127.0.0.1:0", build_registry(AgentCollector(pools=[libvirt_pool, sqlite_pool])))
    endpoint.start()
    try:
        asyncio.run(wedge())
        fam = scrape(endpoint.port)
    finally:
        release.set()
        endpoint.stop()
        libvirt_pool.shutdown(wait=True)
        sqlite_pool.shutdown(wait=True)

    def value(name: str, pool: str) -> float:
        return next(s.value for s in fam[name].samples if s.labels == {"pool": pool} and not s.name.endswith("_created"))

    assert value("cna_agent_blocking_pool_threads", "libvirt") == 2
    assert value("cna_agent_blocking_pool_busy", "libvirt") == 2
    assert value("cna_agent_blocking_pool_stuck", "libvirt") == 1
    assert value("cna_agent_blocking_pool_queued", "libvirt") == 0
    assert value("cna_agent_blocking_pool_deadline_exceeded", "libvirt") == 1
    assert fam["cna_agent_blocking_pool_deadline_exceeded"].samples[0].name == "cna_agent_blocking_pool_deadline_exceeded_total"
    assert (value("cna_agent_blocking_pool_busy", "sqlite"), value("cna_agent_blocking_pool_stuck", "sqlite")) == (0, 0)
