"""Where a VM's vCPUs and memory go on this host's NUMA / SMT / cluster topology.

A pure planner (no I/O): given the host topology, the CPUs reserved for the host, and the
VMs already placed, it decides a new VM's :class:`~cna_agent.contracts.PlacementPlan`
or refuses with the resource that ran out. Compute renders the plan into cputune / numatune /
memoryBacking; :class:`HostPlacer` keeps the placements in the state database so they survive
agent restarts.

Policies (what an admin of a bank or telecom cloud expects, and why):

* **Dedicated VMs take whole cores** ("isolate"): each vCPU gets its own host thread, and the
  sibling threads of those cores are never given to anyone else, not even an odd leftover: a
  busy neighbour on the same core would steal the pinned vCPU's execution units.
* **Pack into clusters**: on Kunpeng 920, 4 cores share an L3 tag (a cluster). A VM's cores
  come from as few clusters as possible, a small VM from a single cluster whenever one has
  room (best fit, so big free clusters stay whole for big VMs); a node where the VM fits in
  one cluster is preferred over a fragmented best-fit node.
* **One NUMA node when it fits**, else the fewest nodes closest to each other (by the SLIT
  distances), with guest NUMA cells mirroring the host nodes so the guest kernel knows.
  Dedicated VMs best-fit nodes (less fragmentation); shared VMs go to the node with the most
  free memory (spread load).
* **Shared VMs float** on the shared pool of their node(s): online CPUs minus the host's
  reserved CPUs minus every dedicated CPU. When a dedicated VM shrinks the pool, the shared
  VMs' pins (and every VM's emulator threads) are re-derived (:meth:`Planner.current_plans`)
  and the agent re-pins them live (host/drift.py). A dedicated VM never takes the last shared
  CPU of a node where shared VMs live (their vCPUs would leave their memory's node).
* **Emulator and I/O threads** run on the shared pool of the VM's node(s) (never on a
  dedicated CPU); with no shared CPUs left there, on the host's reserved CPUs.
* **Memory** is accounted per node against its size minus a host reserve; with hugepages, the
  largest page size the node has free that divides the VM's memory, counted from the kernel's
  pools at planning time (HostPlacer reads them live), so a VM that cannot get its pages is
  refused here, naming the free pages, rather than by QEMU failing to map its RAM.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Sequence

from cna_agent.contracts import GuestNumaCell, PlacementPlan
from cna_agent.errors import FailedPrecondition, InvalidArgument
from cna_agent.host.topology import HostTopology, HugePagePool

#: Memory per NUMA node kept for the host kernel and agent when accounting guests.
DEFAULT_NODE_RESERVE_MIB = 512


@dataclass(frozen=True)
class VmRequest:
    uuid: str
    vcpus: int
    memory_mib: int
    dedicated: bool = False
    hugepages: bool = False
    #: Guest NUMA cells wanted (0 = decide: 1 when one node fits).
    numa_cells: int = 0


@dataclass(frozen=True)
class Placement:
    """What one VM holds on the host (the accounting view of a plan)."""

    uuid: str
    dedicated: bool
    #: Host CPUs the VM owns exclusively (dedicated VMs: pinned threads plus isolated siblings).
    owned_cpus: tuple[int, ...]
    #: MiB of guest memory per host node.
    memory_mib: Mapping[int, int]
    #: Hugepages held per node: {node: (page_kib, count)}.
    hugepages: Mapping[int, tuple[int, int]] = field(default_factory=dict)
    plan: PlacementPlan = field(default_factory=PlacementPlan)

    def to_json(self) -> str:
        data = asdict(self)
        data["memory_mib"] = {str(k): v for k, v in self.memory_mib.items()}
        data["hugepages"] = {str(k): list(v) for k, v in self.hugepages.items()}
        plan = data["plan"]
        plan["vcpu_pins"] = {str(k): list(v) for k, v in self.plan.vcpu_pins.items()}
        plan["iothread_cpus"] = {str(k): list(v) for k, v in self.plan.iothread_cpus.items()}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Placement":
        d = json.loads(text)
        p = d["plan"]
        plan = PlacementPlan(
            vcpu_pins={int(k): tuple(v) for k, v in p["vcpu_pins"].items()},
            emulator_cpus=tuple(p["emulator_cpus"]),
            iothread_cpus={int(k): tuple(v) for k, v in p["iothread_cpus"].items()},
            memory_nodes=tuple(p["memory_nodes"]),
            memory_mode=p["memory_mode"],
            guest_cells=tuple(GuestNumaCell(c["id"], tuple(c["vcpus"]), c["memory_mib"], c["host_node"]) for c in p["guest_cells"]),
            hugepage_kib=p["hugepage_kib"],
            dedicated=p["dedicated"],
        )
        return cls(
            uuid=d["uuid"],
            dedicated=d["dedicated"],
            owned_cpus=tuple(d["owned_cpus"]),
            memory_mib={int(k): v for k, v in d["memory_mib"].items()},
            hugepages={int(k): (v[0], v[1]) for k, v in d["hugepages"].items()},
            plan=plan,
        )


@dataclass(frozen=True)
class _Core:
    node: int
    group: tuple[int, ...]  # cluster identity within the node (or the node alone)
    threads: tuple[int, ...]


class Planner:
    """Placement decisions for one host topology; callers keep the placement map."""

    def __init__(self, topology: HostTopology, *, reserved_cpus: Iterable[int] = (),
                 node_reserve_mib: int = DEFAULT_NODE_RESERVE_MIB) -> None:
        self.topology = topology
        online = set(topology.online_cpus)
        self.reserved = tuple(sorted(set(reserved_cpus) & online))
        self.node_reserve_mib = node_reserve_mib
        self.nodes = {n.id: n for n in topology.numa_nodes}
        self._cpu_node = {c.id: c.node if c.node >= 0 else 0 for c in topology.cpus}
        cores: dict[tuple[int, int, int, int], list[int]] = {}
        groups: dict[tuple[int, int, int, int], tuple[int, ...]] = {}
        for cpu in topology.cpus:
            if cpu.id not in online or cpu.id in self.reserved:
                continue
            node = self._cpu_node[cpu.id]
            key = (cpu.socket, cpu.die, cpu.cluster, cpu.core)
            cores.setdefault(key, []).append(cpu.id)
            groups[key] = (node, cpu.socket, cpu.die, cpu.cluster) if cpu.cluster >= 0 else (node,)
        # A core with a reserved or offline sibling is not whole: dedicated VMs never get it
        # (it stays in the shared pool only).
        siblings = {c.id: set(c.thread_siblings) or {c.id} for c in topology.cpus}
        usable = online - set(self.reserved)
        self.cores = tuple(sorted(
            (_Core(self._cpu_node[ts[0]], groups[k], tuple(sorted(ts))) for k, ts in cores.items()
             if all(siblings[t] <= usable for t in ts)),
            key=lambda c: c.threads,
        ))
        self.usable = tuple(sorted(online - set(self.reserved)))
        #: Hugepage pools per node as counted now (set by HostPlacer before each plan); None:
        #: the topology's counts from start-up.
        self.live_hugepages: Mapping[int, Sequence[HugePagePool]] | None = None
        #: Page sizes (KiB) a hugetlbfs is mounted for (set with live_hugepages); None: unknown.
        self.hugetlbfs_sizes: frozenset[int] | None = None

    # -- accounting --------------------------------------------------------------------------

    def node_capacity_mib(self, node: int) -> int:
        return max(0, self.nodes[node].memory_total_kib // 1024 - self.node_reserve_mib) if node in self.nodes else 0

    def _used_memory(self, placements: Iterable[Placement]) -> dict[int, int]:
        used: dict[int, int] = {}
        for p in placements:
            for node, mib in p.memory_mib.items():
                used[node] = used.get(node, 0) + mib
        return used

    def _pools(self, node: int) -> tuple[HugePagePool, ...]:
        """The node's hugepage pools: the live counts when the placer gave them, else the topology's."""
        if self.live_hugepages is not None:
            return tuple(self.live_hugepages.get(node, ()))
        return self.nodes[node].hugepages if node in self.nodes else ()

    def _free_hugepages(self, node: int, placements: Iterable[Placement]) -> dict[int, int]:
        """Pages of each size a new VM may take on ``node``.

        From the start-up topology: its free count minus what placed VMs hold. From live counts
        (``live_hugepages``): the kernel's free count already excludes the pages running guests
        use, and subtracting them again would refuse VMs that fit (every agent restart with
        hugepage guests running); so the smaller of what is free now and the pool's size minus
        what every placed VM holds, running or not (a stopped VM keeps its claim).
        """
        held: dict[int, int] = {}
        for p in placements:
            if node in p.hugepages:
                size, count = p.hugepages[node]
                held[size] = held.get(size, 0) + count
        if self.live_hugepages is None:
            free = {h.size_kib: h.free for h in self._pools(node)}
            for size, count in held.items():
                free[size] = free.get(size, 0) - count
            return free
        return {h.size_kib: max(0, min(h.free, h.total - held.get(h.size_kib, 0))) for h in self._pools(node)}

    def owned(self, placements: Iterable[Placement]) -> set[int]:
        return {cpu for p in placements if p.dedicated for cpu in p.owned_cpus}

    def shared_pool(self, placements: Iterable[Placement], nodes: Iterable[int] | None = None) -> tuple[int, ...]:
        taken = self.owned(placements)
        wanted = None if nodes is None else set(nodes)
        return tuple(c for c in self.usable if c not in taken and (wanted is None or self._cpu_node[c] in wanted))

    def current_plans(self, placements: Sequence[Placement]) -> dict[str, PlacementPlan]:
        """Every VM's plan as it must be now: what floats on the shared pool (shared VMs' vCPUs,
        every VM's emulator and I/O threads) re-derived after dedicated VMs came or went.

        The agent applies the differences live (re-pinning running VMs), so a new dedicated VM
        never shares a CPU with an older VM's floating threads.
        """
        out: dict[str, PlacementPlan] = {}
        for p in placements:
            pool = self.shared_pool(placements, p.plan.memory_nodes) or self.shared_pool(placements) or self.reserved
            pins = dict(p.plan.vcpu_pins) if p.dedicated else {v: pool for v in p.plan.vcpu_pins}
            out[p.uuid] = PlacementPlan(
                vcpu_pins=pins, emulator_cpus=pool, iothread_cpus={i: pool for i in p.plan.iothread_cpus},
                memory_nodes=p.plan.memory_nodes, memory_mode=p.plan.memory_mode, guest_cells=p.plan.guest_cells,
                hugepage_kib=p.plan.hugepage_kib, dedicated=p.dedicated)
        return out

    # -- planning ----------------------------------------------------------------------------

    def plan(self, req: VmRequest, placements: Sequence[Placement]) -> Placement:
        if req.vcpus < 1:
            raise InvalidArgument("vcpus", f"{req.vcpus} is not a positive vCPU count")
        if req.memory_mib < 1:
            raise InvalidArgument("memory_mib", f"{req.memory_mib} is not a positive size")
        if any(p.uuid == req.uuid for p in placements):
            raise FailedPrecondition(f"VM {req.uuid} is already placed on this host; release it first", field="vm")
        if req.numa_cells < 0 or req.numa_cells > max(1, len(self.nodes)):
            raise InvalidArgument("numa_cells", f"{req.numa_cells} is not in 0..{max(1, len(self.nodes))} (host NUMA nodes)")
        used_mem = self._used_memory(placements)
        taken = self.owned(placements)
        errors: list[str] = []
        for node_set in self._node_sets(req, used_mem, taken, placements):
            try:
                return self._place_on(req, node_set, placements, used_mem, taken)
            except _NoFit as exc:
                errors.append(str(exc))
        # Each node combination tried says what it lacked (best first; a few, so the caller sees
        # e.g. the free hugepages of every node, not only of the first one tried).
        reason = "; ".join(list(dict.fromkeys(errors))[:3]) if errors else "no NUMA node combination can hold it"
        raise FailedPrecondition(f"VM {req.uuid} ({req.vcpus} vCPUs, {req.memory_mib} MiB"
                                 f"{', dedicated' if req.dedicated else ''}{', hugepages' if req.hugepages else ''}) "
                                 f"does not fit this host: {reason}", field="spec")

    def _node_sets(self, req: VmRequest, used_mem: Mapping[int, int], taken: set[int],
                   placements: Sequence[Placement]) -> list[tuple[int, ...]]:
        """Candidate node combinations, best first: single nodes, then nearest groups."""
        ids = sorted(self.nodes) or [0]
        free_mem = {n: self.node_capacity_mib(n) - used_mem.get(n, 0) for n in ids}
        free_cores = {n: sum(1 for c in self.cores if c.node == n and not set(c.threads) & taken) for n in ids}
        if req.dedicated:
            # Best fit, but a node where the VM fits inside one cluster comes first: a small
            # VM is never split across clusters while some node has a cluster with room.
            tpc = max((len(c.threads) for c in self.cores), default=1)
            need = -(-req.vcpus // tpc)
            in_cluster: dict[int, bool] = {}
            for n in ids:
                groups: dict[tuple[int, ...], int] = {}
                for c in self.cores:
                    if c.node == n and not set(c.threads) & taken:
                        groups[c.group] = groups.get(c.group, 0) + 1
                in_cluster[n] = any(k >= need for k in groups.values())
            order = sorted(ids, key=lambda n: (not in_cluster[n], free_cores[n], free_mem[n], n))
        else:
            order = sorted(ids, key=lambda n: (-free_mem[n], n))  # spread
        sizes = [req.numa_cells] if req.numa_cells else list(range(1, len(ids) + 1))
        sets: list[tuple[int, ...]] = []
        for k in sizes:
            if k == 1:
                sets += [(n,) for n in order]
                continue
            for first in order:
                near = sorted((n for n in ids if n != first), key=lambda n: (self._distance(first, n), n))
                combo = tuple(sorted((first, *near[: k - 1])))
                if len(combo) == k and combo not in sets:
                    sets.append(combo)
        return sets

    def _distance(self, a: int, b: int) -> int:
        node = self.nodes.get(a)
        if node is None or b >= len(node.distances):
            return 0 if a == b else 20
        return node.distances[b]

    def _place_on(self, req: VmRequest, nodes: tuple[int, ...], placements: Sequence[Placement],
                  used_mem: Mapping[int, int], taken: set[int]) -> Placement:
        k = len(nodes)
        if req.vcpus < k:
            raise _NoFit(f"{req.vcpus} vCPUs cannot span {k} NUMA nodes")
        vcpu_split = _split(req.vcpus, k)
        mem_split = _split(req.memory_mib, k)
        page_kib = self._page_size(req, nodes, mem_split, placements) if req.hugepages else None
        for node, mib in zip(nodes, mem_split):
            free = self.node_capacity_mib(node) - used_mem.get(node, 0)
            if mib > free:
                raise _NoFit(f"NUMA node {node} has {max(free, 0)} MiB of memory free for guests, {mib} MiB needed")
        pins: dict[int, tuple[int, ...]] = {}
        owned: list[int] = []
        cells: list[GuestNumaCell] = []
        vcpu = 0
        for cell_id, (node, count, mib) in enumerate(zip(nodes, vcpu_split, mem_split)):
            if req.dedicated:
                threads, isolated = self._pick_dedicated(node, count, taken | set(owned))
                owned += isolated
                for t in threads:
                    pins[vcpu] = (t,)
                    vcpu += 1
            else:
                pool = self.shared_pool(placements, [node])
                if not pool:
                    raise _NoFit(f"NUMA node {node} has no shared CPUs left (all dedicated or reserved)")
                for _ in range(count):
                    pins[vcpu] = pool
                    vcpu += 1
            cells.append(GuestNumaCell(cell_id, tuple(range(vcpu - count, vcpu)), mib, node))
        # Emulator threads: shared CPUs of the VM's nodes, counting the CPUs this VM just took.
        scratch = list(placements) + [Placement(req.uuid, True, tuple(owned), {})]
        if req.dedicated:
            # Shared VMs float on their node's shared pool: taking its last CPU would push their
            # vCPUs onto another node, away from their memory.
            for node in nodes:
                if not self.shared_pool(scratch, [node]) and any(
                        not p.dedicated and node in p.plan.memory_nodes for p in placements):
                    raise _NoFit(f"NUMA node {node} would have no shared CPU left for the shared VMs placed there")
        emulator = self.shared_pool(scratch, nodes) or self.shared_pool(scratch) or self.reserved
        if not emulator:
            # Unpinned emulator threads would run on dedicated CPUs, breaking every guarantee.
            raise _NoFit("no CPU would be left for emulator threads (all dedicated; reserve host CPUs with [host] reserved_cpus)")
        plan = PlacementPlan(
            vcpu_pins=pins,
            emulator_cpus=emulator,
            iothread_cpus={1: emulator},
            memory_nodes=nodes,
            memory_mode="strict",
            guest_cells=tuple(cells) if k > 1 or req.numa_cells else (),
            hugepage_kib=page_kib,
            dedicated=req.dedicated,
        )
        hugepages = {}
        if page_kib:
            hugepages = {node: (page_kib, mib * 1024 // page_kib) for node, mib in zip(nodes, mem_split)}
        return Placement(req.uuid, req.dedicated, tuple(sorted(owned)), dict(zip(nodes, mem_split)), hugepages, plan)

    def _page_size(self, req: VmRequest, nodes: tuple[int, ...], mem_split: Sequence[int],
                   placements: Sequence[Placement]) -> int:
        """The largest page size every chosen node has enough free pages of, dividing the memory."""
        sizes = sorted({h.size_kib for n in nodes for h in self._pools(n)}, reverse=True)
        if not sizes:
            raise _NoFit("the host has no hugepage pools")
        if self.hugetlbfs_sizes is not None:
            pooled = sizes
            sizes = [s for s in sizes if s in self.hugetlbfs_sizes]
            if not sizes:
                raise _NoFit(f"no hugetlbfs is mounted for the host's page sizes ({', '.join(f'{s} KiB' for s in pooled)}); "
                             "QEMU maps hugepage memory from a hugetlbfs file: mount one (mount -t hugetlbfs hugetlbfs "
                             "/dev/hugepages) before libvirtd starts")
        for size in sizes:
            if any((mib * 1024) % size for mib in mem_split):
                continue
            if all(self._free_hugepages(n, placements).get(size, 0) >= mib * 1024 // size for n, mib in zip(nodes, mem_split)):
                return size
        free = {n: self._free_hugepages(n, placements) for n in nodes}
        raise _NoFit(f"not enough free hugepages on node(s) {', '.join(map(str, nodes))} for {req.memory_mib} MiB "
                     f"(free pages by size KiB: {free})")

    def _pick_dedicated(self, node: int, count: int, taken: set[int]) -> tuple[list[int], list[int]]:
        """Whole free cores on ``node`` for ``count`` vCPUs, packed into the fewest clusters.

        Returns (threads to pin, in order; every thread of the cores taken, for isolation).
        """
        free = [c for c in self.cores if c.node == node and not set(c.threads) & taken]
        if not free:
            raise _NoFit(f"NUMA node {node} has no free whole cores for dedicated vCPUs")
        tpc = max(len(c.threads) for c in free)
        need = -(-count // tpc)  # whole cores
        if need > len(free):
            raise _NoFit(f"NUMA node {node} has {len(free)} free whole cores, {need} needed for {count} dedicated vCPUs")
        groups: dict[tuple[int, ...], list[_Core]] = {}
        for core in free:
            groups.setdefault(core.group, []).append(core)
        fitting = sorted((g for g in groups.values() if len(g) >= need), key=lambda g: (len(g), g[0].threads))
        if fitting:
            chosen = fitting[0][:need]  # best fit: the smallest group that holds the VM
        else:
            chosen = []
            for g in sorted(groups.values(), key=lambda g: (-len(g), g[0].threads)):  # fewest groups
                chosen += g[: need - len(chosen)]
                if len(chosen) == need:
                    break
        threads = [t for core in chosen for t in core.threads][:count]
        isolated = [t for core in chosen for t in core.threads]
        return threads, isolated


class _NoFit(Exception):
    pass


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]
