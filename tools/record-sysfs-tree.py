#!/usr/bin/env python3
"""Record the sysfs/procfs files the topology probe reads into a directory.

Why: Kunpeng/TaiShan and FusionServer topologies are tested against recorded trees
(tests/fixtures/sysfs/), and the quickest way to reproduce a field report is to record the
admin's host and probe the copy: ``cna_agent.host.topology.probe_topology(root=OUT)``.

    python3 tools/record-sysfs-tree.py --out /tmp/myhost            # live host
    python3 tools/record-sysfs-tree.py --root /mnt/img --out /tmp/x  # another tree

Standalone on purpose (stdlib only, no cna_agent import) so it can be copied onto a host
that has no agent installed. Keep PATTERNS in step with cna_agent/host/topology/; the
unit tests check that probing a recording of this machine equals probing the machine.
Nothing secret is recorded: CPU, cache, NUMA and memory counters only, plus the kernel
release and machine type in recorded.json.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import shutil
import sys
from pathlib import Path

# Directories recreated even when empty (an offline CPU has a cpuN dir but no topology).
DIR_PATTERNS = [
    "sys/devices/system/cpu/cpu[0-9]*",
    "sys/devices/system/node/node[0-9]*",
    "sys/devices/virtual/misc/kvm",
]

PATTERNS = [
    "sys/devices/system/cpu/possible",
    "sys/devices/system/cpu/present",
    "sys/devices/system/cpu/online",
    "sys/devices/system/cpu/kernel_max",
    "sys/devices/system/cpu/cpu[0-9]*/online",
    "sys/devices/system/cpu/cpu[0-9]*/topology/physical_package_id",
    "sys/devices/system/cpu/cpu[0-9]*/topology/die_id",
    "sys/devices/system/cpu/cpu[0-9]*/topology/cluster_id",
    "sys/devices/system/cpu/cpu[0-9]*/topology/core_id",
    "sys/devices/system/cpu/cpu[0-9]*/topology/thread_siblings_list",
    "sys/devices/system/cpu/cpu[0-9]*/topology/core_siblings_list",
    "sys/devices/system/cpu/cpu[0-9]*/topology/cluster_cpus_list",
    "sys/devices/system/cpu/cpu[0-9]*/cache/index[0-9]*/level",
    "sys/devices/system/cpu/cpu[0-9]*/cache/index[0-9]*/type",
    "sys/devices/system/cpu/cpu[0-9]*/cache/index[0-9]*/size",
    "sys/devices/system/cpu/cpu[0-9]*/cache/index[0-9]*/shared_cpu_list",
    "sys/devices/system/cpu/cpu[0-9]*/regs/identification/midr_el1",
    "sys/devices/system/cpu/cpu[0-9]*/regs/identification/revidr_el1",
    "sys/devices/system/node/possible",
    "sys/devices/system/node/online",
    "sys/devices/system/node/has_cpu",
    "sys/devices/system/node/has_memory",
    "sys/devices/system/node/node[0-9]*/cpulist",
    "sys/devices/system/node/node[0-9]*/meminfo",
    "sys/devices/system/node/node[0-9]*/distance",
    "sys/devices/system/node/node[0-9]*/hugepages/hugepages-*kB/nr_hugepages",
    "sys/devices/system/node/node[0-9]*/hugepages/hugepages-*kB/free_hugepages",
    "sys/devices/system/node/node[0-9]*/hugepages/hugepages-*kB/surplus_hugepages",
    "sys/kernel/mm/hugepages/hugepages-*kB/nr_hugepages",
    "sys/kernel/mm/hugepages/hugepages-*kB/free_hugepages",
    "sys/kernel/mm/hugepages/hugepages-*kB/resv_hugepages",
    "sys/kernel/mm/hugepages/hugepages-*kB/surplus_hugepages",
    "sys/devices/virtual/misc/kvm/dev",
    "proc/cpuinfo",
    "proc/meminfo",
]

# sysfs attributes are at most a page; /proc/cpuinfo of a big host is a few hundred KiB.
MAX_FILE = 4 * 1024 * 1024


def _read(path: str) -> bytes | None:
    """File content, or None for files the kernel refuses to read (EIO on some attributes)."""
    try:
        with open(path, "rb") as f:
            return f.read(MAX_FILE)
    except OSError:
        return None


def record(root: Path, out: Path) -> int:
    """Copy every matching file from root into out; returns how many were copied."""
    copied = 0
    for pattern in DIR_PATTERNS:
        for src in sorted(glob.glob(str(root / pattern))):
            if os.path.isdir(src):
                (out / os.path.relpath(src, root)).mkdir(parents=True, exist_ok=True)
    for pattern in PATTERNS:
        for src in sorted(glob.glob(str(root / pattern))):
            data = _read(src)
            if data is None:
                continue
            dst = out / os.path.relpath(src, root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
            copied += 1
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Record the topology-relevant sysfs/procfs files.")
    parser.add_argument("--root", type=Path, default=Path("/"), help="tree to record (default: live host)")
    parser.add_argument("--out", type=Path, required=True, help="directory to create")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    if args.out.exists():
        if not args.force:
            print(f"{args.out} exists; use --force to replace it", file=sys.stderr)
            return 1
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    count = record(args.root, args.out)
    meta = {
        "tool": "tools/record-sysfs-tree.py",
        "root": str(args.root),
        "machine": platform.machine() if str(args.root) == "/" else None,
        "kernel": platform.release() if str(args.root) == "/" else None,
        "recorded": datetime.date.today().isoformat(),
        "files": count,
    }
    (args.out / "recorded.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"recorded {count} files into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
