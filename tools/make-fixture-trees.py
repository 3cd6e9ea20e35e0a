#!/usr/bin/env python3
"""Synthesize the recorded-style sysfs/procfs trees under tests/fixtures/sysfs/.

We have no Kunpeng or FusionServer in CI, so these trees are *generated* from the
published topology of the machines (Huawei TaiShan 200 model 2280 with 2x Kunpeng 920-4826;
FusionServer 2288H V5 with 2x Xeon Gold 6248), in the exact file formats Linux uses. They
hold only the files cna_agent.host.topology reads (plus a few neighbours that make the tree
look like the real thing). Regenerate with:

    python tools/make-fixture-trees.py [--out tests/fixtures/sysfs]

The output is deterministic, so a regenerated tree diffs clean against the committed one.
For a real host, use tools/record-sysfs-tree.py instead.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cpulist(ids: list[int]) -> str:
    """Kernel %*pbl formatting: ascending ranges joined by commas."""
    ids = sorted(set(ids))
    out: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


class Tree:
    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, rel: str, text: str) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text if text.endswith("\n") or text == "" else text + "\n")

    def mkdir(self, rel: str) -> None:
        (self.root / rel).mkdir(parents=True, exist_ok=True)

    def node_link(self, cpu_dir: str, node: int) -> None:
        """cpuN/nodeM is a symlink to the node's directory in sysfs (and git keeps symlinks,
        while it drops empty directories)."""
        link = self.root / cpu_dir / f"node{node}"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(f"../../node/node{node}")


def node_meminfo(nid: int, total: int, free: int, huge_total: int, huge_free: int) -> str:
    used = total - free
    rows = [
        ("MemTotal", total), ("MemFree", free), ("MemUsed", used), ("SwapCached", 0),
        ("Active", used // 3), ("Inactive", used // 4), ("Active(anon)", used // 5),
        ("Inactive(anon)", 0), ("Active(file)", used // 7), ("Inactive(file)", used // 4),
        ("Unevictable", 0), ("Mlocked", 0), ("Dirty", 0), ("Writeback", 0),
        ("FilePages", used // 3), ("Mapped", used // 40), ("AnonPages", used // 5),
        ("Shmem", 2048), ("KernelStack", 11200), ("PageTables", 4096), ("SecPageTables", 0),
        ("NFS_Unstable", 0), ("Bounce", 0), ("WritebackTmp", 0), ("KReclaimable", 90112),
        ("Slab", 262144), ("SReclaimable", 90112), ("SUnreclaim", 172032),
        ("AnonHugePages", 0), ("ShmemHugePages", 0), ("ShmemPmdMapped", 0),
        ("FileHugePages", 0), ("FilePmdMapped", 0),
    ]
    lines = [f"Node {nid} {k + ':':<16}{v:>10} kB" for k, v in rows]
    lines += [
        f"Node {nid} HugePages_Total: {huge_total:>5}",
        f"Node {nid} HugePages_Free:  {huge_free:>5}",
        f"Node {nid} HugePages_Surp:  {0:>5}",
    ]
    return "\n".join(lines)


def proc_meminfo(total: int, free: int, huge_total: int, huge_free: int, huge_size: int) -> str:
    rows = [
        ("MemTotal", total), ("MemFree", free), ("MemAvailable", free + total // 50),
        ("Buffers", 12288), ("Cached", total // 60), ("SwapCached", 0), ("Active", total // 40),
        ("Inactive", total // 50), ("SwapTotal", 0), ("SwapFree", 0), ("Dirty", 0),
        ("AnonPages", total // 80), ("Mapped", total // 900), ("Shmem", 8192),
        ("Slab", 1048576), ("PageTables", 16384), ("CommitLimit", total // 2),
        ("Committed_AS", total // 70), ("VmallocTotal", 133143461888 // 1024),
        ("AnonHugePages", 0),
    ]
    lines = [f"{k + ':':<16}{v:>10} kB" for k, v in rows]
    lines += [
        f"HugePages_Total: {huge_total:>8}",
        f"HugePages_Free:  {huge_free:>8}",
        f"HugePages_Rsvd:  {0:>8}",
        f"HugePages_Surp:  {0:>8}",
        f"{'Hugepagesize:':<16}{huge_size:>10} kB",
        f"{'Hugetlb:':<16}{huge_total * huge_size:>10} kB",
    ]
    return "\n".join(lines)


def hugepool(t: Tree, base: str, size_kib: int, total: int, free: int, host: bool) -> None:
    d = f"{base}/hugepages-{size_kib}kB"
    t.write(f"{d}/nr_hugepages", str(total))
    t.write(f"{d}/free_hugepages", str(free))
    t.write(f"{d}/surplus_hugepages", "0")
    if host:
        t.write(f"{d}/resv_hugepages", "0")
        t.write(f"{d}/nr_overcommit_hugepages", "0")


# --------------------------------------------------------------------------- Kunpeng 920


def kunpeng920_2s(t: Tree) -> None:
    """TaiShan 200 (2280), 2x Kunpeng 920-4826, openEuler/EulerOS 64K-page kernel.

    48 cores per socket in 2 dies (SCCLs) of 24 cores; each die is a NUMA node with its
    own 24 MiB L3; clusters (CCLs) of 4 cores; no SMT. arm64 has no die_id attribute.
    """
    ncpu, per_socket, per_node = 96, 48, 24
    cpu = "sys/devices/system/cpu"
    all_ids = list(range(ncpu))
    for name in ("possible", "present", "online"):
        t.write(f"{cpu}/{name}", cpulist(all_ids))
    t.write(f"{cpu}/kernel_max", "1023")
    for c in all_ids:
        base = f"{cpu}/cpu{c}"
        node = c // per_node
        t.write(f"{base}/topology/physical_package_id", str(c // per_socket))
        t.write(f"{base}/topology/cluster_id", str(c // 4))
        t.write(f"{base}/topology/core_id", str(c))
        t.write(f"{base}/topology/thread_siblings_list", str(c))
        t.write(f"{base}/topology/core_siblings_list",
                cpulist(list(range(c // per_socket * per_socket, (c // per_socket + 1) * per_socket))))
        t.write(f"{base}/topology/cluster_cpus_list", cpulist(list(range(c // 4 * 4, c // 4 * 4 + 4))))
        caches = [
            (1, "Data", "64K", [c]),
            (1, "Instruction", "64K", [c]),
            (2, "Unified", "512K", [c]),
            (3, "Unified", "24576K", list(range(node * per_node, (node + 1) * per_node))),
        ]
        for k, (level, ctype, size, shared) in enumerate(caches):
            idx = f"{base}/cache/index{k}"
            t.write(f"{idx}/level", str(level))
            t.write(f"{idx}/type", ctype)
            t.write(f"{idx}/size", size)
            t.write(f"{idx}/shared_cpu_list", cpulist(shared))
        t.write(f"{base}/regs/identification/midr_el1", "0x00000000481fd010")
        t.write(f"{base}/regs/identification/revidr_el1", "0x0000000000000000")
        t.node_link(base, node)

    node = "sys/devices/system/node"
    for name in ("possible", "online", "has_cpu", "has_memory", "has_normal_memory"):
        t.write(f"{node}/{name}", "0-3")
    distances = [[10, 12, 20, 22], [12, 10, 22, 24], [20, 22, 10, 12], [22, 24, 12, 10]]
    # 16 x 32 GiB DIMMs, 4 per node; node 0 loses a little more to the kernel image.
    totals = [132386816, 133660672, 133660672, 133627904]
    frees = [101203968, 118829056, 104775680, 120193024]
    # (2 MiB pages total/free, 512 MiB pages total/free) per node
    pools = [(0, 0, 32, 20), (1024, 1024, 32, 32), (0, 0, 32, 8), (512, 256, 0, 0)]
    for n in range(4):
        base = f"{node}/node{n}"
        t.write(f"{base}/cpulist", cpulist(list(range(n * per_node, (n + 1) * per_node))))
        t.write(f"{base}/distance", " ".join(str(d) for d in distances[n]))
        p2_tot, p2_free, p512_tot, p512_free = pools[n]
        t.write(f"{base}/meminfo", node_meminfo(n, totals[n], frees[n], p512_tot, p512_free))
        hugepool(t, f"{base}/hugepages", 2048, p2_tot, p2_free, host=False)
        hugepool(t, f"{base}/hugepages", 524288, p512_tot, p512_free, host=False)
    mm = "sys/kernel/mm/hugepages"
    hugepool(t, mm, 2048, sum(p[0] for p in pools), sum(p[1] for p in pools), host=True)
    hugepool(t, mm, 524288, sum(p[2] for p in pools), sum(p[3] for p in pools), host=True)
    t.write("sys/devices/virtual/misc/kvm/dev", "10:232")

    features = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
                "jscvt fcma dcpop asimddp asimdfhm")
    blocks = [
        f"processor\t: {c}\nBogoMIPS\t: 200.00\nFeatures\t: {features}\nCPU implementer\t: 0x48\n"
        f"CPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: 0xd01\nCPU revision\t: 0\n"
        for c in all_ids
    ]
    t.write("proc/cpuinfo", "\n".join(blocks) + "\n")
    t.write("proc/meminfo", proc_meminfo(sum(totals), sum(frees), sum(p[2] for p in pools),
                                         sum(p[3] for p in pools), 524288))


# --------------------------------------------------------------------------- Xeon Gold 6248


XEON_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi mmx "
    "fxsr sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc art arch_perfmon pebs bts "
    "rep_good nopl xtopology nonstop_tsc cpuid aperfmperf pni pclmulqdq dtes64 monitor ds_cpl vmx "
    "smx est tm2 ssse3 sdbg fma cx16 xtpr pdcm pcid dca sse4_1 sse4_2 x2apic movbe popcnt "
    "tsc_deadline_timer aes xsave avx f16c rdrand lahf_lm abm 3dnowprefetch cpuid_fault epb cat_l3 "
    "cdp_l3 invpcid_single intel_ppin ssbd mba ibrs ibpb stibp ibrs_enhanced tpr_shadow vnmi "
    "flexpriority ept vpid ept_ad fsgsbase tsc_adjust bmi1 hle avx2 smep bmi2 erms invpcid rtm cqm "
    "mpx rdt_a avx512f avx512dq rdseed adx smap clflushopt clwb intel_pt avx512cd avx512bw avx512vl "
    "xsaveopt xsavec xgetbv1 xsaves cqm_llc cqm_occup_llc cqm_mbm_total cqm_mbm_local dtherm ida arat "
    "pln pts pku ospke avx512_vnni md_clear flush_l1d arch_capabilities"
)
# Cascade Lake parts are cut from 28-core dies, so core_id has holes; keep them.
XEON_CORE_IDS = [0, 1, 2, 3, 4, 8, 9, 10, 11, 16, 17, 18, 19, 20, 24, 25, 26, 27, 28, 29]


def fusionserver_2s(t: Tree) -> None:
    """FusionServer 2288H V5, 2x Xeon Gold 6248 (20C/40T each), 12 x 32 GiB, 4K pages.

    Linux numbers the first thread of every core first (cpu0-19 socket 0, 20-39 socket 1),
    then the SMT siblings (40-59, 60-79). Kernel 5.10-style: die_id present, no cluster_id.
    """
    ncpu, cores = 80, 20
    cpu = "sys/devices/system/cpu"
    all_ids = list(range(ncpu))
    for name in ("possible", "present", "online"):
        t.write(f"{cpu}/{name}", cpulist(all_ids))
    t.write(f"{cpu}/kernel_max", "8191")
    for c in all_ids:
        k = c % 40
        socket = k // cores
        first = k
        siblings = [first, first + 40]
        socket_cpus = [x for x in all_ids if (x % 40) // cores == socket]
        base = f"{cpu}/cpu{c}"
        t.write(f"{base}/topology/physical_package_id", str(socket))
        t.write(f"{base}/topology/die_id", "0")
        t.write(f"{base}/topology/core_id", str(XEON_CORE_IDS[k % cores]))
        t.write(f"{base}/topology/thread_siblings_list", cpulist(siblings))
        t.write(f"{base}/topology/core_siblings_list", cpulist(socket_cpus))
        caches = [
            (1, "Data", "32K", siblings),
            (1, "Instruction", "32K", siblings),
            (2, "Unified", "1024K", siblings),
            (3, "Unified", "28160K", socket_cpus),
        ]
        for idx_no, (level, ctype, size, shared) in enumerate(caches):
            idx = f"{base}/cache/index{idx_no}"
            t.write(f"{idx}/level", str(level))
            t.write(f"{idx}/type", ctype)
            t.write(f"{idx}/size", size)
            t.write(f"{idx}/shared_cpu_list", cpulist(shared))
        if c != 0:
            t.write(f"{base}/online", "1")
        t.node_link(base, socket)

    node = "sys/devices/system/node"
    for name in ("possible", "online", "has_cpu", "has_memory", "has_normal_memory"):
        t.write(f"{node}/{name}", "0-1")
    totals = [196231168, 198160384]
    frees = [150994944, 171966464]
    # (2 MiB total/free, 1 GiB total/free) per node
    pools = [(4096, 2048, 64, 60), (0, 0, 64, 64)]
    for n in range(2):
        base = f"{node}/node{n}"
        t.write(f"{base}/cpulist", cpulist([x for x in all_ids if (x % 40) // cores == n]))
        t.write(f"{base}/distance", "10 21" if n == 0 else "21 10")
        p2_tot, p2_free, p1g_tot, p1g_free = pools[n]
        t.write(f"{base}/meminfo", node_meminfo(n, totals[n], frees[n], p2_tot, p2_free))
        hugepool(t, f"{base}/hugepages", 2048, p2_tot, p2_free, host=False)
        hugepool(t, f"{base}/hugepages", 1048576, p1g_tot, p1g_free, host=False)
    mm = "sys/kernel/mm/hugepages"
    hugepool(t, mm, 2048, sum(p[0] for p in pools), sum(p[1] for p in pools), host=True)
    hugepool(t, mm, 1048576, sum(p[2] for p in pools), sum(p[3] for p in pools), host=True)
    t.write("sys/devices/virtual/misc/kvm/dev", "10:232")

    blocks = []
    for c in all_ids:
        k = c % 40
        socket = k // cores
        core = XEON_CORE_IDS[k % cores]
        apic = socket * 64 + core * 2 + (c // 40)
        blocks.append(
            f"processor\t: {c}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 85\n"
            f"model name\t: Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz\nstepping\t: 7\n"
            f"microcode\t: 0x5003604\ncpu MHz\t\t: 2500.000\ncache size\t: 28160 KB\n"
            f"physical id\t: {socket}\nsiblings\t: 40\ncore id\t\t: {core}\ncpu cores\t: 20\n"
            f"apicid\t\t: {apic}\ninitial apicid\t: {apic}\nfpu\t\t: yes\nfpu_exception\t: yes\n"
            f"cpuid level\t: 22\nwp\t\t: yes\nflags\t\t: {XEON_FLAGS}\n"
            f"bugs\t\t: spectre_v1 spectre_v2 spec_store_bypass swapgs taa itlb_multihit mmio_stale_data retbleed\n"
            f"bogomips\t: 5000.00\nclflush size\t: 64\ncache_alignment\t: 64\n"
            f"address sizes\t: 46 bits physical, 48 bits virtual\npower management:\n"
        )
    t.write("proc/cpuinfo", "\n".join(blocks) + "\n")
    t.write("proc/meminfo", proc_meminfo(sum(totals), sum(frees), sum(p[0] for p in pools),
                                         sum(p[1] for p in pools), 2048))


TREES = {"kunpeng920-2s": kunpeng920_2s, "fusionserver-2s": fusionserver_2s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "sysfs")
    parser.add_argument("names", nargs="*", default=sorted(TREES), help="trees to (re)generate")
    args = parser.parse_args()
    for name in args.names:
        target = args.out / name
        if target.exists():
            shutil.rmtree(target)
        TREES[name](Tree(target))
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
