"""A real Prometheus server scrapes the real agent, with a real guest running.

The agent (``cna-agent serve``, embedded libvirt) serves its metrics endpoint on a loopback
port and boots the x86_64 test guest under TCG; the endpoint's exposition must pass
``promtool check metrics`` (parse and lint) without a complaint. Then ``prometheus`` itself
(the Debian package tools/setup.sh installs) runs as a child process with its config and TSDB in
the test's tmp_path, scrapes the agent every second, and its HTTP API is asked what an
operator's dashboard (docs/grafana/cna-node.json) would ask. The answers are judged from outside
the agent: the guest's vCPU count and memory from libvirt's live domain XML (the embedded
driver's status file), its QEMU's CPU time from /proc, host CPUs and memory from the kernel,
and the RPC counts from the calls this test made.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from cna_agent.api import pb
from support.agent import free_port
from support.guests import guest_spec, serial_log
from support.operations import ok
from support.tools import REPO
from support.waiting import wait_for

vm = pb.vm_pb2
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the embedded QEMU driver here needs root")

JOB = "cna-agent"
#: Distinct from guest_spec's defaults (1 vCPU, 192 MiB), so a metric cannot match by accident.
VCPUS, MEMORY_MIB = 2, 224


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run tools/setup.sh (Debian package prometheus)")
    return path


class PrometheusServer:
    """``prometheus`` as a child process; config, TSDB and log all under ``base``."""

    def __init__(self, base: Path, targets: list[str]) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config = base / "prometheus.yml"
        self.data = base / "tsdb"
        self.log = base / "prometheus.log"
        # YAML is a superset of JSON: no YAML writer needed.
        self.config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": JOB, "metrics_path": "/metrics",
                                "static_configs": [{"targets": targets}]}],
        }, indent=2))
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        check = subprocess.run([_tool("promtool"), "check", "config", str(self.config)], capture_output=True, text=True,
                               timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        with self.log.open("wb") as logfh:
            self.proc = subprocess.Popen(
                [_tool("prometheus"), f"--config.file={self.config}", f"--storage.tsdb.path={self.data}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h", "--log.level=info"],
                stdout=logfh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.base)
        wait_for(self._ready, 60, f"prometheus /-/ready on port {self.port}", interval=0.3)

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def query(self, promql: str) -> list[dict]:
        """An instant query's vector: [{"metric": {labels}, "value": [time, "value"]}, ...]."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        assert body["data"]["resultType"] == "vector", body
        return body["data"]["result"]

    def value(self, promql: str) -> float | None:
        """The single sample ``promql`` selects now, or None while Prometheus has none."""
        result = self.query(promql)
        assert len(result) <= 1, f"{promql} selects {len(result)} series: {result}"
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def prometheus_factory(tmp_path):
    """Start a Prometheus scraping ``targets``; stopped (and checked gone) after the test."""
    servers: list[PrometheusServer] = []

    def start(targets: list[str]) -> PrometheusServer:
        server = PrometheusServer(tmp_path / f"prometheus{len(servers)}", targets)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()
        assert server.proc is None or server.proc.poll() is not None


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def live_domain(agent) -> ET.Element:
    """The running guest's live XML as libvirt keeps it (the embedded driver's status file,
    <root>/run/qemu/<name>.xml: what ``virsh dumpxml`` would print for a running domain)."""
    files = sorted((agent.dir / "state" / "libvirt" / "run" / "qemu").glob("*.xml"))
    assert len(files) == 1, files
    return ET.parse(files[0]).getroot()


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` (the vCPU threads included), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kib(element: ET.Element) -> int:
    factor = {"KiB": 1, "MiB": 1024, "GiB": 1 << 20}[element.get("unit", "KiB")]
    return int(element.text) * factor


@pytest.mark.slow
def test_prometheus_scrapes_the_agent_with_a_running_guest(vm_agent_factory, prometheus_factory, tmp_path):
    metrics_port = free_port()
    agent = vm_agent_factory(extra_config=f'[stats]\ninterval_s = 1.0\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n')
    with agent.channel() as ch:
        stub = pb.vm_pb2_grpc.VmServiceStub(ch)
        spec = guest_spec("x86_64", "prom-guest", vcpus=VCPUS, memory_mib=MEMORY_MIB)
        created = ok(ch, stub.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60), 180, into=vm.Vm())
        serial_log(agent, created.uuid).wait_for(r"CNA-GUEST-READY boot=", timeout=120)

    # What libvirt itself says about the running domain.
    dom = live_domain(agent)
    assert dom.get("state") == "running", dom.attrib
    domain = dom.find("domain")
    name = domain.findtext("name")
    vcpu = domain.find("vcpu")
    vcpus_max = int(vcpu.text)
    vcpus_current = int(vcpu.get("current", vcpus_max))
    assert (vcpus_current, vcpus_max) == (VCPUS, VCPUS)
    memory_bytes = kib(domain.find("memory")) * 1024
    current_memory_bytes = kib(domain.find("currentMemory")) * 1024
    assert memory_bytes == MEMORY_MIB << 20

    # 1. promtool parses and lints the exposition, once the guest is in a sample.
    def exposition_with_guest() -> str | None:
        text = scrape_text(metrics_port)
        return text if f'libvirt_domain_info_cpu_time_seconds_total{{domain="{name}"' in text else None

    text = wait_for(exposition_with_guest, 30, "the guest in the agent's exposition")
    (tmp_path / "agent-metrics.txt").write_text(text)  # what promtool judged, for a failure's reader
    lint = subprocess.run([_tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), \
        f"promtool check metrics exited {lint.returncode}:\n{lint.stdout}{lint.stderr}"

    # 2. A real Prometheus scrapes the endpoint every second.
    target = f"127.0.0.1:{metrics_port}"
    prom = prometheus_factory([target])
    wait_for(lambda: prom.value(f'up{{job="{JOB}"}}') == 1, 30, "the agent's target up")
    # RPCs made while Prometheus watches, a scrape apart, so rates and latencies have increases.
    get_calls = 5
    with agent.channel() as ch:
        stub = pb.vm_pb2_grpc.VmServiceStub(ch)
        for _ in range(get_calls):
            got = stub.GetVm(vm.GetVmRequest(vm=created.uuid), timeout=10)
            time.sleep(0.5)
    assert got.status.state == vm.VM_STATE_RUNNING
    qemu_pid = int(got.status.qemu_pid)
    sel = f'{{job="{JOB}",domain="{name}"}}'

    def scraped(metric: str, labels: str = sel) -> float:
        return wait_for(lambda: prom.value(metric + labels), 30, f"{metric}{labels} in prometheus")

    assert scraped("libvirt_domain_vcpu_current") == vcpus_current
    assert scraped("libvirt_domain_vcpu_maximum") == vcpus_max
    assert scraped("libvirt_domain_balloon_maximum_bytes") == memory_bytes
    assert scraped("libvirt_domain_balloon_current_bytes") == current_memory_bytes
    assert scraped("libvirt_domain_info_state", f'{{job="{JOB}",domain="{name}",state="running"}}') == 1
    assert len(prom.query(f"libvirt_domain_vcpu_time_seconds_total{sel}")) == vcpus_current

    # The guest's CPU time is > 0, never more than its QEMU process has used, and grows.
    first = scraped("libvirt_domain_info_cpu_time_seconds_total")
    assert 0 < first <= proc_cpu_seconds(qemu_pid) + 0.5
    later = wait_for(lambda: (v := prom.value(f"libvirt_domain_info_cpu_time_seconds_total{sel}")) is not None and v > first and v, 30,
                     "the guest's CPU time to grow between two queries")
    assert later <= proc_cpu_seconds(qemu_pid) + 0.5

    # Host figures against the kernel's.
    assert scraped("cna_host_cpus", f'{{job="{JOB}"}}') == os.cpu_count()
    mem_total_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemTotal:"))
    assert scraped("cna_host_memory_total_bytes", f'{{job="{JOB}"}}') == mem_total_kib * 1024
    assert scraped("cna_host_vms_running", f'{{job="{JOB}"}}') == 1

    # The RPC counter counts at least the GetVm calls this test made (all answered OK).
    rpc = f'{{job="{JOB}",method="/cna.v1.VmService/GetVm",code="OK"}}'
    assert wait_for(lambda: (v := prom.value(f"cna_agent_rpc_requests_total{rpc}")) is not None and v >= get_calls and v, 30,
                    "the GetVm calls counted") >= get_calls
    assert scraped("cna_agent_rpc_duration_seconds_count", f'{{job="{JOB}",method="/cna.v1.VmService/GetVm"}}') >= get_calls
    # No VRM configured: the link reports "disabled".
    assert scraped("cna_agent_vrm_link_state", f'{{job="{JOB}",state="disabled"}}') == 1

    # 3. Every query of the Grafana dashboard is valid PromQL for this Prometheus, and every
    # panel shows data except those about what this guest lacks (disks, NICs, balloon
    # statistics) or RPC errors.
    dashboard = json.loads((REPO / "docs" / "grafana" / "cna-node.json").read_text())
    variables = {"$__rate_interval": "1m", "$instance": target, "$domain": name}
    no_data_here = {"VM disk throughput", "VM disk IOPS", "VM NIC throughput", "VM NIC packets, errors and drops",
                    "VM guest memory use", "RPC errors by method and code"}
    queried = set()
    for panel in [p for row in dashboard["panels"] for p in [row, *row.get("panels", [])]]:
        for t in panel.get("targets", []):
            expr = t["expr"]
            for var, value in variables.items():
                expr = expr.replace(var, value)
            result = prom.query(expr)  # invalid PromQL is HTTP 400: urlopen raises
            assert result or panel["title"] in no_data_here, f"panel {panel['title']!r}: no data for {expr}"
            queried.add(panel["title"])
    assert no_data_here < queried and len(queried) > 20
    cpu = prom.query(f'rate(libvirt_domain_info_cpu_time_seconds_total{{instance="{target}"}}[1m])')
    assert [r["metric"]["domain"] for r in cpu] == [name] and float(cpu[0]["value"][1]) > 0
    rpc_rate = prom.query(f'sum by (method) (rate(cna_agent_rpc_requests_total{{instance="{target}"}}[1m]))')
    assert float({r["metric"]["method"]: r["value"][1] for r in rpc_rate}["/cna.v1.VmService/GetVm"]) > 0
