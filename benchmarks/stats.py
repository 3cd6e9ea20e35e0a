"""VM stats at scale, counted in every process: the agent's collector against libvirt's calls.

``python -m benchmarks.stats [--vms 200] [--rounds 7] [--driver auto|system|embedded]``

Setup: N real QEMU TCG guests (32 MiB, 1 vCPU, a 1 MiB qcow2 disk, a tap NIC, a virtio balloon
with a stats period and the agent's QMP side channel each), started PAUSED: 200 running TCG
guests, even idle in SeaBIOS, cost about 1.5% of a core each here, more than the 2 shared
cores this machine has, while a paused QEMU answers every stats query (monitor, /proc, tap
counters) the same way and burns nothing. Through libvirtd (qemu:///system, every call an
RPC) when it answers, else the embedded driver. Measured in one child process, interleaved
round by round, each path's CPU in the sampling process, in libvirtd and in the QEMUs (every
thread's schedstat: what the monitor work costs QEMU; paused guests burn nothing else):

* ``bulk``: the agent's collector (compute/vm_counters.py) as it samples each interval: /proc
  for CPU, vCPUs, RSS and NICs, the QMP side channel only for guests whose vCPUs ran (none,
  here: they are paused);
* ``all_busy``: the same collector taking every guest for one whose vCPUs ran (what a host of
  running guests costs: each guest's disks asked every sample, its memory report once a
  minute);
* ``libvirt_bulk``: ``virConnectGetAllDomainStats`` for the six groups (what the sampler did
  before, and still does with ``[stats] vm_sources = "libvirt"``);
* ``per_domain`` (the baseline): listAllDomains, then per VM dom.info, dom.vcpus,
  dom.memoryStats, dom.blockStats per disk and dom.interfaceStats per NIC.

Then the real agent is started on the same root with a short stats interval and left alone:
its RSS, and per interval its own CPU, libvirtd's and QEMU's (the idle QEMUs' CPU over as long
before the agent started is taken off). The last line is JSON: ``bulk_cpu_ms``,
``bulk_libvirtd_cpu_ms``, ``bulk_qemu_cpu_ms``, ``bulk_total_cpu_ms``, the same for
``all_busy``, ``libvirt_bulk`` and ``per_domain``, and the ratios of per-domain to each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHILD = r'''
import asyncio, json, os, statistics, sys, time
import libvirt
libvirt.registerErrorHandler(lambda c, e: None, None)
libvirt.virEventRegisterDefaultImpl()
import threading
threading.Thread(target=lambda: [libvirt.virEventRunDefaultImpl() for _ in iter(int, 1)], daemon=True).start()
from xml.sax.saxutils import escape
from cna_agent.hypervisor import prepare_embedded_root
from cna_agent.compute.qmp import QEMU_NS, QmpSideChannel, commandline_args
from cna_agent.compute.vm_counters import VmCounters
from cna_agent.errors import Unavailable
from cna_agent.vrm.stats import bulk_call, parse_records, stats_flags, parse_groups
from benchmarks.stats import qemu_cpu_ns, qemu_pids
mode, uri, n, rounds, images, prefix = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
if uri.startswith("qemu:///embed"):
    prepare_embedded_root(uri.split("root=", 1)[1])
conn = libvirt.open(uri)
import psutil
daemon = next((p for p in psutil.process_iter(["name"]) if p.info["name"] in ("libvirtd", "virtqemud")), None) if "embed" not in uri else None
def dcpu():
    return sum(daemon.cpu_times()[:2]) if daemon is not None else 0.0
XML = """<domain type='qemu' xmlns:qemu='{ns}'><name>{prefix}-{i}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{img}'/><target dev='vda' bus='virtio'/></disk>
<interface type='ethernet'><model type='virtio'/><rom enabled='no'/></interface><memballoon model='virtio'><stats period='10'/></memballoon>
</devices><qemu:commandline>{args}</qemu:commandline></domain>"""
def sock(i):
    return f"{images}/q{i}.sock"
if mode == "cleanup":
    for d in conn.listAllDomains():
        if d.name().startswith(prefix + "-"):
            try:
                d.destroy()
            except libvirt.libvirtError:
                pass
            d.undefine()
    sys.exit(0)
t0 = time.monotonic()
for i in range(n):
    args = "".join(f"<qemu:arg value='{escape(a)}'/>" for a in commandline_args(sock(i)))
    dom = conn.defineXML(XML.format(ns=QEMU_NS, prefix=prefix, i=i, img=f"{images}/d{i}.qcow2", args=args))
    dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
started_s = time.monotonic() - t0
doms = [d for d in conn.listAllDomains() if d.isActive() and d.name().startswith(prefix + "-")]
by_uuid = {d.UUIDString(): int(d.name().rsplit("-", 1)[1]) for d in doms}
pids = qemu_pids(images)
import xml.etree.ElementTree as ET
devices = {}
for d in doms:
    tree = ET.fromstring(d.XMLDesc())
    disks = [t.get("dev") for t in tree.findall("./devices/disk/target")]
    nics = [t.get("dev") for t in tree.findall("./devices/interface/target") if t.get("dev")]
    devices[d.UUIDString()] = (disks, nics)
groups = parse_groups("state,cpu-total,vcpu,balloon,block,interface")
flags = stats_flags(groups)
loop = asyncio.new_event_loop()
channels = {}
async def execute(vm, command, args):
    if vm not in by_uuid:
        raise Unavailable("not ours")
    if vm not in channels:
        channels[vm] = QmpSideChannel(sock(by_uuid[vm]))
        await channels[vm].connect()
    return await channels[vm].execute(command, args)
counters = VmCounters(lambda fn: asyncio.to_thread(fn, conn), execute)

def libvirt_bulk():
    return [r for r in bulk_call(conn, flags) if r[0] in devices]

def host(ran=False):
    counters.assume_ran = ran
    return [r for r in loop.run_until_complete(counters.collect(groups, flags)) if r[0] in devices]

def per_domain():
    out = {}
    for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        u = d.UUIDString()
        if u not in devices:
            continue
        disks, nics = devices[u]
        info = d.info(); vc = d.vcpus(); mem = d.memoryStats()
        blk = [d.blockStats(x) for x in disks]
        net = []
        for x in nics:
            try:
                net.append(d.interfaceStats(x))
            except libvirt.libvirtError:
                pass
        out[u] = (info, vc, mem, blk, net)
    return out

cases = {"bulk": host, "all_busy": lambda: host(True), "libvirt_bulk": libvirt_bulk, "per_domain": per_domain}
host(); host(True); libvirt_bulk(); per_domain()  # layouts built, side channels open, caches warm
res = {k: {"cpu": [], "wall": [], "daemon": [], "qemu": []} for k in cases}
prev = {}
for _ in range(rounds):
    for k, fn in cases.items():
        d, q, c, w = dcpu(), qemu_cpu_ns(pids), time.process_time(), time.perf_counter()
        out = fn()
        res[k]["cpu"].append(time.process_time() - c); res[k]["wall"].append(time.perf_counter() - w)
        res[k]["qemu"].append((qemu_cpu_ns(pids) - q) / 1e9); res[k]["daemon"].append(dcpu() - d)
        if k == "bulk":
            sampled = parse_records(out, prev, 2.0); prev = {v.uuid: v for v in sampled}
summary = {k: {m: statistics.median(v) * 1000 for m, v in r.items()} for k, r in res.items()}
print(json.dumps({"running": len(doms), "start_s": round(started_s, 1), "summary": summary,
                  "vms_sampled": len(prev), "vms_with_nic_stats": sum(1 for v in prev.values() if v.nics),
                  "vms_with_disk_stats": sum(1 for v in prev.values() if v.disks),
                  "libvirt_fallbacks": counters.fallbacks,
                  "disks_per_vm": statistics.mean(len(v.disks) for v in prev.values()) if prev else 0}))
for ch in channels.values():
    loop.run_until_complete(ch.close())
conn.close()
'''


def qemu_pids(marker: str) -> list[int]:
    """The QEMU processes whose command line names ``marker`` (this run's image directory)."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmd.split(b"\0", 1)[0] and marker.encode() in cmd:
                out.append(int(proc.name))
    return out


def qemu_cpu_ns(pids: list[int]) -> int:
    """CPU nanoseconds run so far by every thread of these processes (schedstat: exact, not ticks)."""
    total = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as fh:
                    total += int(fh.read().split()[0])
            except OSError:
                pass
    return total


def kill_guests(marker: str) -> None:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmd.split(b"\0", 1)[0] and marker.encode() in cmd:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def make_images(images: Path, n: int) -> None:
    images.mkdir(parents=True, exist_ok=True)
    base = images / "d0.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True, timeout=60, capture_output=True)
    for i in range(1, n):
        shutil.copyfile(base, images / f"d{i}.qcow2")


def agent_phase(base: Path, uri: str, n: int, interval: float, intervals: int) -> dict:
    """The real agent sampling the guests: its RSS, and CPU per interval in the agent, libvirtd
    and QEMU (the idle QEMUs' own CPU measured first over as long, and taken off)."""
    import psutil

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.agent import free_port

    port = free_port()
    cfg = base / "agent.toml"
    sock = base / "run" / "a.sock"
    cfg.write_text(f'[grpc]\nlisten = ""\nunix_socket = "{sock}"\n[state]\ndir = "{base / "state"}"\nrun_dir = "{base / "run"}"\n'
                   f'[libvirt]\nuri = "{uri}"\n[log]\nlevel = "{os.environ.get("CNA_BENCH_AGENT_LOG", "warning")}"\n'
                   f'[stats]\ninterval_s = {interval}\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    pids = qemu_pids(str(base / "images"))
    daemon = next((p for p in psutil.process_iter(["name"]) if p.info["name"] in ("libvirtd", "virtqemud")), None)
    if "embed" in uri:
        daemon = None

    def daemon_s() -> float:
        return sum(daemon.cpu_times()[:2]) if daemon is not None else 0.0

    window = interval * intervals
    q0, d0 = qemu_cpu_ns(pids), daemon_s()
    time.sleep(window)
    idle_qemu, idle_daemon = (qemu_cpu_ns(pids) - q0) / 1e9, daemon_s() - d0
    script = Path(sys.executable).with_name("cna-agent")
    proc = subprocess.Popen([str(script), "serve", "--config", str(cfg)], stdout=(base / "agent.log").open("wb"), stderr=subprocess.STDOUT)
    try:
        def scrape() -> dict[str, float]:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            out = {}
            for line in text.splitlines():
                if line.startswith(("cna_vms ", "cna_agent_stats_sample_cpu_seconds ", "cna_agent_stats_sample_seconds ")):
                    k, v = line.split()
                    out[k] = float(v)
            return out

        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError((base / "agent.log").read_text()[-3000:])
            try:
                if scrape().get("cna_vms", 0) >= n:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the agent did not sample the VMs within 300 s")
            time.sleep(0.5)
        p = psutil.Process(proc.pid)
        # Settled: the first samples build every VM's layout and open its side channel (a few
        # monitor commands each); measure once QEMU's CPU over an interval is back near idle.
        settle_deadline = time.monotonic() + 300
        while time.monotonic() < settle_deadline:
            q = qemu_cpu_ns(pids)
            time.sleep(interval)
            if (qemu_cpu_ns(pids) - q) / 1e9 <= idle_qemu * interval / window + 0.0001 * n:
                break
        time.sleep(interval)
        # Nothing else is asked of the agent meanwhile (a scrape costs it CPU too).
        c0, q0, d0 = sum(p.cpu_times()[:2]), qemu_cpu_ns(pids), daemon_s()
        t0 = time.monotonic()
        time.sleep(interval * intervals)
        elapsed = time.monotonic() - t0
        c1, q1, d1 = sum(p.cpu_times()[:2]), qemu_cpu_ns(pids), daemon_s()
        sample_cpu = [scrape()["cna_agent_stats_sample_cpu_seconds"]]
        per = elapsed / interval
        agent_ms = (c1 - c0) / per * 1000
        qemu_ms = max(0.0, ((q1 - q0) / 1e9 - idle_qemu * elapsed / window)) / per * 1000
        daemon_ms = max(0.0, (d1 - d0) - idle_daemon * elapsed / window) / per * 1000
        return {"agent_rss_mb": round(p.memory_info().rss / 2**20, 1),
                "agent_cpu_ms_per_interval": round(agent_ms, 1),
                "agent_qemu_cpu_ms_per_interval": round(qemu_ms, 1),
                "agent_libvirtd_cpu_ms_per_interval": round(daemon_ms, 1),
                "agent_total_cpu_ms_per_interval": round(agent_ms + qemu_ms + daemon_ms, 1),
                "agent_sample_cpu_ms": round(statistics.median(sample_cpu) * 1000, 1)}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def system_uri_answers() -> bool:
    """qemu:///system is usable when libvirtd/virtqemud answers (tools/testbed.py up libvirtd)."""
    from cna_agent.hypervisor import choose_uri

    return choose_uri("", "/nonexistent") == "qemu:///system"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.stats")
    ap.add_argument("--vms", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--intervals", type=int, default=5)
    ap.add_argument("--driver", choices=("auto", "system", "embedded"), default="auto",
                    help="libvirt to measure: system = libvirtd (production, every call an RPC), embedded = in-process")
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="cbs", dir="/tmp"))
    base.chmod(0o711)  # QEMU under libvirtd may run unprivileged and must reach the images
    driver = args.driver if args.driver != "auto" else ("system" if system_uri_answers() else "embedded")
    uri = "qemu:///system" if driver == "system" else f"qemu:///embed?root={base / 'state' / 'libvirt'}"
    prefix = f"cbs{os.getpid()}"

    def child(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", CHILD, mode, uri, str(args.vms), str(args.rounds), str(base / "images"), prefix],
                              capture_output=True, text=True, timeout=1800,
                              cwd=str(Path(__file__).resolve().parents[1]))

    try:
        make_images(base / "images", args.vms)
        for f in (base / "images").iterdir():
            f.chmod(0o666)
        (base / "images").chmod(0o755)
        out = child("measure")
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        m = json.loads(out.stdout.strip().splitlines()[-1])
        sm = m["summary"]
        print(f"libvirt: {driver} ({uri}); {m['running']} QEMU TCG guests up, paused (started in {m['start_s']} s); "
              f"the sample saw {m['vms_sampled']}, {m['disks_per_vm']:.0f} disk(s)/VM, disk stats for {m['vms_with_disk_stats']}, "
              f"NIC stats for {m['vms_with_nic_stats']}, {m['libvirt_fallbacks']} sampled through libvirt")
        print(f"CPU per sample, median of {args.rounds}, ms (sampler's process / libvirtd / QEMU = total, wall):")
        for k, label in (("bulk", "agent's collector"), ("all_busy", "collector, every guest asked"),
                         ("libvirt_bulk", "libvirt bulk call"), ("per_domain", "per-domain calls")):
            r = sm[k]
            print(f"  {label:30s} {r['cpu']:8.1f} / {r['daemon']:7.1f} / {r['qemu']:8.1f} = {r['cpu'] + r['daemon'] + r['qemu']:8.1f}   ({r['wall']:.1f} wall)")
        agent = agent_phase(base, uri, m["running"], args.interval, args.intervals)
        print(f"real agent sampling every {args.interval:g} s: RSS {agent['agent_rss_mb']} MiB, per interval "
              f"{agent['agent_cpu_ms_per_interval']} ms agent + {agent['agent_libvirtd_cpu_ms_per_interval']} ms libvirtd + "
              f"{agent['agent_qemu_cpu_ms_per_interval']} ms QEMU, {agent['agent_sample_cpu_ms']} ms of the agent's in the sample")

        def total(k: str) -> float:
            return sm[k]["cpu"] + sm[k]["daemon"] + sm[k]["qemu"]

        result = {
            "vms": m["running"],
            "driver": f"qemu-tcg guests (paused), libvirt {driver}",
            "bulk_cpu_ms": round(sm["bulk"]["cpu"], 2),
            "bulk_libvirtd_cpu_ms": round(sm["bulk"]["daemon"], 2),
            "bulk_qemu_cpu_ms": round(sm["bulk"]["qemu"], 2),
            "bulk_total_cpu_ms": round(total("bulk"), 2),
            "all_busy_total_cpu_ms": round(total("all_busy"), 2),
            "all_busy_qemu_cpu_ms": round(sm["all_busy"]["qemu"], 2),
            "libvirt_bulk_total_cpu_ms": round(total("libvirt_bulk"), 2),
            "libvirt_bulk_qemu_cpu_ms": round(sm["libvirt_bulk"]["qemu"], 2),
            "per_domain_cpu_ms": round(sm["per_domain"]["cpu"], 2),
            "per_domain_libvirtd_cpu_ms": round(sm["per_domain"]["daemon"], 2),
            "per_domain_qemu_cpu_ms": round(sm["per_domain"]["qemu"], 2),
            "per_domain_total_cpu_ms": round(total("per_domain"), 2),
            "per_domain_vs_bulk_total_ratio": round(total("per_domain") / max(total("bulk"), 1e-6), 2),
            "per_domain_vs_all_busy_total_ratio": round(total("per_domain") / max(total("all_busy"), 1e-6), 2),
            "bulk_wall_ms": round(sm["bulk"]["wall"], 2),
            "per_domain_wall_ms": round(sm["per_domain"]["wall"], 2),
            "libvirt_fallbacks": m["libvirt_fallbacks"],
            **agent,
        }
        print(json.dumps(result))
        return 0
    finally:
        if driver == "system":
            child("cleanup")
        else:
            kill_guests(str(base / "state" / "libvirt"))
            time.sleep(1)
        if not os.environ.get("CNA_BENCH_KEEP"):
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
