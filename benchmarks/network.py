"""Benchmark: ensuring network state through protocols vs through command-line tools.

1. 100 port groups on an OVS bridge (one access port each: VLAN tag + port-group external id)
   through the OVSDB IDL in ONE transaction (what NetworkService does) against 100
   ``ovs-vsctl`` invocations doing the same, on the same private ovsdb-server (started here,
   no ovs-vswitchd, so both sides measure database work only: ``--no-wait`` for ovs-vsctl,
   no vswitchd wait for the IDL). The final states are compared and must be identical.
2. N Linux bridges (create, MTU, up) through netlink (pyroute2, one socket) against ``ip``
   commands doing the same, in a scratch network namespace removed afterwards.

Medians of interleaved trials; the last line is one JSON object with ovsdb_ms, vsctl_ms,
netlink_ms, iproute_ms and the ratios.

    python -m benchmarks.network [--ports 100] [--bridges 20] [--trials 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from cna_agent.network.ovsdb import OvsdbClient, PortWant

SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"


def run(cmd: list[str], timeout: float = 30) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


class PrivateOvsdb:
    """An ovsdb-server on a socket in a temp dir (no vswitchd: database work only)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cna-bench-ovs-"))
        self.sock = self.dir / "db.sock"
        self.remote = f"unix:{self.sock}"
        run(["ovsdb-tool", "create", str(self.dir / "conf.db"), SCHEMA])
        run(["ovsdb-server", str(self.dir / "conf.db"), f"--remote=punix:{self.sock}", f"--pidfile={self.dir / 'ovsdb.pid'}",
             f"--unixctl={self.dir / 'ovsdb.ctl'}", f"--log-file={self.dir / 'ovsdb.log'}", "--detach"])
        self.vsctl("init")

    def vsctl(self, *args: str) -> str:
        return run(["ovs-vsctl", f"--db={self.remote}", "--no-wait", "--timeout=20", *args])

    def close(self) -> None:
        pid_file = self.dir / "ovsdb.pid"
        try:
            os.kill(int(pid_file.read_text().strip()), 15)
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
        shutil.rmtree(self.dir, ignore_errors=True)


def _state(client: OvsdbClient, bridge: str, ports: int) -> set[tuple[str, int | None, str, str]]:
    """The bridge's ports as the IDL replica sees them, once the server's updates arrived."""
    deadline = time.monotonic() + 10
    while True:
        br = client.pool.run_sync(lambda: client.bridges().get(bridge))
        state = {(p.name, p.tag, p.external_ids.get("port-group", ""), p.iface_type)
                 for p in (br.ports.values() if br else ()) if p.name != bridge}
        if len(state) == ports and all(s[1] is not None and s[2] for s in state) or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def bench_ovs(ports: int, trials: int) -> dict[str, float]:
    db = PrivateOvsdb()
    client = OvsdbClient(db.remote, timeout=30)
    bridge = "br-bench"
    wants = [PortWant(name=f"pg{i}", tag=100 + i, iface_type="internal", external_ids=(("port-group", f"pg-{i}"),)) for i in range(ports)]
    ovsdb_t, vsctl_t = [], []
    try:
        client.pool.run_sync(client.idl)  # the agent keeps one warm connection
        states = []
        for _ in range(trials):
            db.vsctl("--if-exists", "del-br", bridge, "--", "add-br", bridge)
            t = time.perf_counter()
            changes = client.pool.run_sync(lambda: client.ensure_ports(bridge, wants, wait_vswitchd=False))
            ovsdb_t.append(time.perf_counter() - t)
            assert len(changes) == ports, changes[:3]
            states.append(_state(client, bridge, ports))

            db.vsctl("--if-exists", "del-br", bridge, "--", "add-br", bridge)
            t = time.perf_counter()
            for i in range(ports):
                db.vsctl("add-port", bridge, f"pg{i}", "--", "set", "Interface", f"pg{i}", "type=internal",
                         "--", "set", "Port", f"pg{i}", f"tag={100 + i}", f"external_ids:port-group=pg-{i}")
            vsctl_t.append(time.perf_counter() - t)
            states.append(_state(client, bridge, ports))
        if any(s != states[0] for s in states) or len(states[0]) != ports:
            raise AssertionError("OVSDB and ovs-vsctl runs did not reach the same final state")
    finally:
        client.close()
        db.close()
    return {"ovsdb_ms": statistics.median(ovsdb_t) * 1000, "vsctl_ms": statistics.median(vsctl_t) * 1000}


def bench_netlink(bridges: int, trials: int) -> dict[str, float]:
    from pyroute2 import NetNS, netns

    name = f"cna-bench-{uuid.uuid4().hex[:6]}"
    netns.create(name)
    netlink_t, ip_t = [], []
    names = [f"bb{i}" for i in range(bridges)]

    def final(ns: NetNS) -> set[tuple[str, int, bool]]:
        return {(l.get_attr("IFLA_IFNAME"), l.get_attr("IFLA_MTU"), bool(l["flags"] & 1))
                for l in ns.get_links() if l.get_attr("IFLA_IFNAME") in names}

    def clear(ns: NetNS) -> None:
        for n in names:
            idx = ns.link_lookup(ifname=n)
            if idx:
                ns.link("del", index=idx[0])

    try:
        with NetNS(name) as ns:
            states = []
            for _ in range(trials):
                clear(ns)
                t = time.perf_counter()
                for n in names:
                    ns.link("add", ifname=n, kind="bridge")
                    idx = ns.link_lookup(ifname=n)[0]
                    ns.link("set", index=idx, mtu=1400, state="up")
                netlink_t.append(time.perf_counter() - t)
                states.append(final(ns))

                clear(ns)
                t = time.perf_counter()
                for n in names:
                    run(["ip", "-n", name, "link", "add", n, "type", "bridge"])
                    run(["ip", "-n", name, "link", "set", n, "mtu", "1400", "up"])
                ip_t.append(time.perf_counter() - t)
                states.append(final(ns))
            clear(ns)
        if any(s != states[0] for s in states) or len(states[0]) != bridges:
            raise AssertionError("netlink and ip runs did not reach the same final state")
    finally:
        netns.remove(name)
    return {"netlink_ms": statistics.median(netlink_t) * 1000, "iproute_ms": statistics.median(ip_t) * 1000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", type=int, default=100)
    parser.add_argument("--bridges", type=int, default=20)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print(json.dumps({"ovsdb_ms": None, "vsctl_ms": None, "netlink_ms": None, "iproute_ms": None, "error": "needs root"}))
        return 1
    ovs = bench_ovs(args.ports, args.trials)
    nl = bench_netlink(args.bridges, args.trials)
    print(f"{args.ports} port groups on an OVS bridge, median of {args.trials}:")
    print(f"  OVSDB IDL, one transaction : {ovs['ovsdb_ms']:9.1f} ms")
    print(f"  {args.ports} x ovs-vsctl          : {ovs['vsctl_ms']:9.1f} ms  ({ovs['vsctl_ms'] / ovs['ovsdb_ms']:.1f}x slower)")
    print(f"{args.bridges} Linux bridges (create, mtu, up) in a scratch netns, median of {args.trials}:")
    print(f"  netlink (pyroute2)         : {nl['netlink_ms']:9.1f} ms")
    print(f"  {2 * args.bridges} x ip link              : {nl['iproute_ms']:9.1f} ms  ({nl['iproute_ms'] / nl['netlink_ms']:.1f}x slower)")
    out = {**{k: round(v, 2) for k, v in {**ovs, **nl}.items()},
           "vsctl_over_ovsdb": round(ovs["vsctl_ms"] / ovs["ovsdb_ms"], 2),
           "iproute_over_netlink": round(nl["iproute_ms"] / nl["netlink_ms"], 2),
           "ports": args.ports, "bridges": args.bridges, "trials": args.trials}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
