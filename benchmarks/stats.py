"""VM stats at scale: one bulk libvirt call per interval vs per-domain calls, and the agent's RSS.

``python -m benchmarks.stats [--vms 200] [--rounds 7]``

Setup: N real QEMU TCG guests (32 MiB, 1 vCPU, a 1 MiB qcow2 disk and a tap NIC each, so
block and interface stats exist), started PAUSED: 200 running TCG guests, even idle in
SeaBIOS, cost about 1.5% of a core each here, i.e. more than the 2 shared cores this machine
has, while a paused QEMU answers every stats query (monitor, /proc, tap counters) the same
way and burns nothing. Through libvirtd (qemu:///system, what production uses: every call is
an RPC) when it answers, else the embedded driver. Measured in one child process, interleaved
round by round:

* bulk: what the agent's sampler does each interval — ``virConnectGetAllDomainStats`` for
  state, cpu-total, vcpu, balloon, block, interface (``bulk_call``) plus parsing into samples
  and rates (``parse_records``);
* per-domain (the baseline): listAllDomains, then per VM dom.info, dom.vcpus, dom.memoryStats,
  dom.blockStats per disk and dom.interfaceStats per NIC (device names cached beforehand).

CPU is the process's own (``time.process_time``: every thread, libvirt's embedded driver and
its monitor I/O included), medians over the rounds. Then the real agent is started on the
same root with a 2 s stats interval: its RSS (psutil) and its own CPU per interval while it
samples N VMs, as seen from outside ("agent_sample_cpu_ms" is the process CPU while the
agent's sample was in flight, so it includes whatever else the agent did meanwhile). Result on
the 2-core test machine, 200 guests through libvirtd: bulk 12.5 ms vs per-domain 161 ms agent
CPU per interval (12.9x), libvirtd 460 vs 590 ms, agent RSS 77 MiB. The last line is JSON with vms, bulk_cpu_ms,
per_domain_cpu_ms, agent_rss_mb.
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
import json, statistics, sys, time
import libvirt
libvirt.registerErrorHandler(lambda c, e: None, None)
libvirt.virEventRegisterDefaultImpl()
import threading
threading.Thread(target=lambda: [libvirt.virEventRunDefaultImpl() for _ in iter(int, 1)], daemon=True).start()
from cna_agent.hypervisor import prepare_embedded_root
from cna_agent.vrm.stats import bulk_call, parse_records, stats_flags, parse_groups
mode, uri, n, rounds, images, prefix = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
if uri.startswith("qemu:///embed"):
    prepare_embedded_root(uri.split("root=", 1)[1])
conn = libvirt.open(uri)
import psutil
daemon = next((p for p in psutil.process_iter(["name"]) if p.info["name"] in ("libvirtd", "virtqemud")), None) if "embed" not in uri else None
def dcpu():
    return sum(daemon.cpu_times()[:2]) if daemon is not None else 0.0
XML = """<domain type='qemu'><name>{prefix}-{i}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{img}'/><target dev='vda' bus='virtio'/></disk>
<interface type='ethernet'><model type='virtio'/><rom enabled='no'/></interface><memballoon model='virtio'/>
<graphics type='vnc' autoport='no' port='-1' listen='127.0.0.1'/></devices></domain>"""
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
    dom = conn.defineXML(XML.replace("{prefix}", prefix).replace("{i}", str(i)).replace("{img}", f"{images}/d{i}.qcow2").replace("<graphics type='vnc' autoport='no' port='-1' listen='127.0.0.1'/>", ""))
    dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
started_s = time.monotonic() - t0
doms = [d for d in conn.listAllDomains() if d.isActive() and d.name().startswith(prefix + "-")]
import xml.etree.ElementTree as ET
devices = {}
for d in doms:
    tree = ET.fromstring(d.XMLDesc())
    disks = [t.get("dev") for t in tree.findall("./devices/disk/target")]
    nics = [t.get("dev") for t in tree.findall("./devices/interface/target") if t.get("dev")]
    if not nics:
        nics = [a.get("name") for a in tree.findall("./devices/interface/alias")]
    devices[d.UUIDString()] = (disks, nics)
flags = stats_flags(parse_groups("state,cpu-total,vcpu,balloon,block,interface"))

def bulk(prev):
    recs = [r for r in bulk_call(conn, flags) if r[0] in devices]
    return {v.uuid: v for v in parse_records(recs, prev, 2.0)}

def per_domain():
    out = {}
    for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        u = d.UUIDString()
        if u not in devices:
            continue
        disks, nics = devices.get(u, ((), ()))
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

prev = bulk({})
per_domain()
b_cpu, p_cpu, b_wall, p_wall, b_d, p_d = [], [], [], [], [], []
for _ in range(rounds):
    d, c, w = dcpu(), time.process_time(), time.perf_counter(); prev = bulk(prev)
    b_cpu.append(time.process_time() - c); b_wall.append(time.perf_counter() - w); b_d.append(dcpu() - d)
    d, c, w = dcpu(), time.process_time(), time.perf_counter(); res = per_domain()
    p_cpu.append(time.process_time() - c); p_wall.append(time.perf_counter() - w); p_d.append(dcpu() - d)
nets = sum(1 for v in res.values() if v[4])
print(json.dumps({"running": len(doms), "start_s": round(started_s, 1), "bulk_cpu_ms": statistics.median(b_cpu) * 1000,
                  "per_domain_cpu_ms": statistics.median(p_cpu) * 1000, "bulk_wall_ms": statistics.median(b_wall) * 1000,
                  "per_domain_wall_ms": statistics.median(p_wall) * 1000,
                  "bulk_daemon_cpu_ms": statistics.median(b_d) * 1000, "per_domain_daemon_cpu_ms": statistics.median(p_d) * 1000, "vms_sampled": len(prev), "vms_with_nic_stats": nets,
                  "disks_per_vm": statistics.mean(len(v.disks) for v in prev.values()) if prev else 0}))
conn.close()
'''


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
    import psutil

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.agent import free_port

    port = free_port()
    cfg = base / "agent.toml"
    sock = base / "run" / "a.sock"
    cfg.write_text(f'[grpc]\nlisten = ""\nunix_socket = "{sock}"\n[state]\ndir = "{base / "state"}"\nrun_dir = "{base / "run"}"\n'
                   f'[libvirt]\nuri = "{uri}"\n[log]\nlevel = "warning"\n'
                   f'[stats]\ninterval_s = {interval}\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
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

        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError((base / "agent.log").read_text()[-3000:])
            try:
                if scrape().get("cna_vms", 0) >= n:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the agent did not sample the VMs within 180 s")
            time.sleep(0.5)
        p = psutil.Process(proc.pid)
        time.sleep(interval)  # one more sample so rates exist
        sample_cpu = []
        c0 = sum(p.cpu_times()[:2])
        t0 = time.monotonic()
        for _ in range(intervals):
            time.sleep(interval)
            sample_cpu.append(scrape()["cna_agent_stats_sample_cpu_seconds"])
        c1 = sum(p.cpu_times()[:2])
        elapsed = time.monotonic() - t0
        rss = p.memory_info().rss
        return {"agent_rss_mb": round(rss / 2**20, 1),
                "agent_cpu_ms_per_interval": round((c1 - c0) / (elapsed / interval) * 1000, 1),
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
                              capture_output=True, text=True, timeout=1800)

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
        print(f"libvirt: {driver} ({uri}); {m['running']} QEMU TCG guests up, paused (started in {m['start_s']} s); "
              f"bulk sample saw {m['vms_sampled']}, {m['disks_per_vm']:.0f} disk(s)/VM, NIC stats for {m['vms_with_nic_stats']}")
        print(f"per interval, median of {args.rounds}: bulk {m['bulk_cpu_ms']:.1f} ms agent CPU ({m['bulk_wall_ms']:.1f} ms wall, "
              f"libvirtd {m['bulk_daemon_cpu_ms']:.1f} ms) vs per-domain {m['per_domain_cpu_ms']:.1f} ms agent CPU "
              f"({m['per_domain_wall_ms']:.1f} ms wall, libvirtd {m['per_domain_daemon_cpu_ms']:.1f} ms): "
              f"per-domain = {m['per_domain_cpu_ms'] / max(m['bulk_cpu_ms'], 1e-6):.2f}x the bulk call's agent CPU")
        agent = agent_phase(base, uri, m["running"], args.interval, args.intervals)
        print(f"real agent sampling every {args.interval:g} s: RSS {agent['agent_rss_mb']} MiB, "
              f"{agent['agent_cpu_ms_per_interval']} ms CPU per interval in total, {agent['agent_sample_cpu_ms']} ms of it in the sample")
        result = {
            "vms": m["running"],
            "driver": f"qemu-tcg guests (paused), libvirt {driver}",
            "bulk_cpu_ms": round(m["bulk_cpu_ms"], 2),
            "per_domain_cpu_ms": round(m["per_domain_cpu_ms"], 2),
            "per_domain_vs_bulk_cpu_ratio": round(m["per_domain_cpu_ms"] / max(m["bulk_cpu_ms"], 1e-6), 2),
            "bulk_wall_ms": round(m["bulk_wall_ms"], 2),
            "per_domain_wall_ms": round(m["per_domain_wall_ms"], 2),
            "bulk_libvirtd_cpu_ms": round(m["bulk_daemon_cpu_ms"], 2),
            "per_domain_libvirtd_cpu_ms": round(m["per_domain_daemon_cpu_ms"], 2),
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
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
