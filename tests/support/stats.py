"""Records in the exact flat-key format virConnectGetAllDomainStats returns for a QEMU domain.

Why here: the stats parser and the Prometheus exporter are both tested on the same records, with
round numbers so the expected rates are obvious.
"""

from __future__ import annotations

import libvirt


def qemu_like(cpu_s: float, rd: int, wr: int, rx: int, tx: int, state: int = libvirt.VIR_DOMAIN_RUNNING) -> dict:
    return {
        "state.state": state, "state.reason": 1,
        "cpu.time": int(cpu_s * 1e9), "cpu.user": 0, "cpu.system": 0,
        "balloon.current": 262144, "balloon.maximum": 262144, "balloon.rss": 180000,
        "vcpu.current": 2, "vcpu.maximum": 4,
        "vcpu.0.state": 1, "vcpu.0.time": 5_000_000_000, "vcpu.0.wait": 0,
        "vcpu.1.state": 1, "vcpu.1.time": 6_000_000_000, "vcpu.1.wait": 0,
        "net.count": 1, "net.0.name": "vnet0", "net.0.rx.bytes": rx, "net.0.rx.pkts": 10, "net.0.rx.errs": 0,
        "net.0.rx.drop": 1, "net.0.tx.bytes": tx, "net.0.tx.pkts": 20, "net.0.tx.errs": 0, "net.0.tx.drop": 0,
        "block.count": 2,
        "block.0.name": "vda", "block.0.path": "/images/a.qcow2", "block.0.rd.reqs": 5, "block.0.rd.bytes": rd,
        "block.0.rd.times": 1000, "block.0.wr.reqs": 6, "block.0.wr.bytes": wr, "block.0.wr.times": 2000,
        "block.0.fl.reqs": 3, "block.0.fl.times": 10, "block.0.allocation": 1 << 20, "block.0.capacity": 1 << 30,
        "block.1.name": "sda", "block.1.path": "/images/cd.iso",
    }
