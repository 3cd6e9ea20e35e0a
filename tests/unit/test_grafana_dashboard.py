"""docs/grafana/cna-node.json cannot drift from what the agent exports.

Every metric name in every panel's PromQL (and in the template variables' label_values queries)
must be a sample name of the agent's exposition, built from cna_agent/metrics.py with a real
StateStore/EventHub, a stats snapshot parsed from bulk-stats records (one disk, one NIC), a
real BlockingPool and an RPC call recorded, as tests/unit/test_metrics.py does. The dashboard's
queries are evaluated by a real Prometheus in tests/e2e/test_prometheus_scrape.py.
"""

from __future__ import annotations

import asyncio
import json
import re
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cna_agent.blocking import BlockingPool
from cna_agent.metrics import AgentCollector, build_registry, rpc_on_call
from cna_agent.state.eventlog import EventHub, EventLog
from cna_agent.state.store import StateStore
from cna_agent.vrm.link import LinkStatus
from cna_agent.vrm.stats import StatsSnapshot, parse_record
from support.stats import qemu_like
from support.tools import REPO

DASHBOARD = REPO / "docs" / "grafana" / "cna-node.json"
#: Series Prometheus makes itself for every target (not in the agent's exposition).
PROMETHEUS_MADE = {"up"}

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
             "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions,
    keywords, label names or values, grouping labels, ranges or Grafana variables."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values)
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges and subqueries ($__rate_interval)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)  # grouping labels
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if m.group(0).lower() in _KEYWORDS or re.match(r"\s*\(", e[m.end():]):
            continue
        names.add(m.group(0))
    return names


def test_metric_names_of_promql():
    assert metric_names('sum by (method, le) (rate(a_bucket{instance=~"$instance",code!="OK"}[$__rate_interval]))') == {"a_bucket"}
    assert metric_names("a_bytes{x=\"y\"} - on (instance) group_left b_bytes offset 5m") == {"a_bytes", "b_bytes"}
    assert metric_names("histogram_quantile(0.99, x) / 1e9 > bool 0") == {"x"}
    assert metric_names("-rate(c_total[1m])") == {"c_total"}


class FakeLink:
    def status(self) -> LinkStatus:
        return LinkStatus(state="connected", address="127.0.0.1:1", last_sequence=3, acked_sequence=2, connects=1)


@pytest.fixture(scope="module")
def exposed(tmp_path_factory) -> set[str]:
    """Every sample name the agent's endpoint would serve (``_total``, ``_bucket``... included)."""
    store = StateStore(tmp_path_factory.mktemp("dash") / "agent.db")
    hub = EventHub(store, EventLog(store))
    asyncio.run(hub.publish("test.event", message="x"))
    a = parse_record("u-1", "web1", qemu_like(10, 1000, 2000, 300, 400), None, 0)
    b = parse_record("u-1", "web1", qemu_like(12, 5096, 4000, 1300, 800), a, 2.0)
    host = SimpleNamespace(cpu=SimpleNamespace(percent=12.5, iowait=1.0, steal=0.0), logical_cpus=2,
                           memory={"total": 8 << 30, "available": 4 << 30}, load=(0.5, 0.4, 0.3),
                           vms_running=1, vms_total=1, hypervisor_connected=True)
    sampler = SimpleNamespace(latest=StatsSnapshot(time=0, monotonic=0, interval_s=2.0, vms=(b,), call_s=0.01, cpu_s=0.002),
                              latest_host=host, errors=0)
    rpc_on_call("/cna.v1.VmService/GetVm", "OK", 0.002)
    pool = BlockingPool("libvirt", 1, 30)
    try:
        registry = build_registry(AgentCollector(sampler=sampler, link=FakeLink(), store=store, events=hub, pools=[pool]))
        text = generate_latest(registry).decode()
    finally:
        pool.shutdown(wait=True)
        store.close()
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def panels(dashboard: dict) -> list[dict]:
    """Every panel, those inside (collapsed) rows included."""
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def exprs(dashboard: dict) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels(dashboard) for t in p.get("targets", [])]


def test_every_metric_the_dashboard_queries_is_exported(exposed):
    dash = load()
    queried = exprs(dash)
    assert len(queried) > 20
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q)
            assert m, f"variable {var['name']}: {q}"
            queried.append((f"variable {var['name']}", m.group(1)))
    missing = []
    for title, expr in queried:
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        missing += [f"{title}: {n}" for n in sorted(names - exposed - PROMETHEUS_MADE)]
    assert not missing, "metrics the dashboard uses but the agent does not export:\n" + "\n".join(missing)


def test_dashboard_shape():
    dash = load()
    assert 38 <= dash["schemaVersion"] < 40 and dash["uid"] == "cna-node"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids))
    for p in panels(dash):
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and '"$instance"' in t["expr"], (p["title"], t["expr"])
    titles = {p["title"] for p in panels(dash)}
    for needed in ("Host CPU", "Host memory", "VMs running", "VM CPU", "VM memory", "VM disk throughput",
                   "VM NIC throughput", "RPC rate by method", "RPC latency p99 by method", "VRM event link"):
        assert needed in titles
