"""hypothesis strategies for the placement planner's inputs: host topologies (sockets x nodes x
clusters x cores x threads, with memory and 2 MiB pages) and mixes of VM requests.

Why here: two test modules state planner properties over the same generated hosts and VMs.
"""

from __future__ import annotations

from hypothesis import strategies as stg

from cna_agent.host.topology import CpuInfo, HostTopology, HugePagePool, NumaNode


@stg.composite
def topologies(draw) -> HostTopology:
    sockets = draw(stg.integers(1, 2))
    nodes_per_socket = draw(stg.integers(1, 2))
    clusters = draw(stg.integers(1, 3))
    cores = draw(stg.integers(1, 4))
    threads = draw(stg.integers(1, 2))
    cpus: list[CpuInfo] = []
    node_cpus: dict[int, list[int]] = {}
    cpu_id = 0
    core_ids = []
    for s in range(sockets):
        for n in range(nodes_per_socket):
            node = s * nodes_per_socket + n
            for cl in range(clusters):
                for co in range(cores):
                    core_id = (n * clusters + cl) * cores + co
                    core_ids.append((s, core_id))
                    first = cpu_id
                    sibs = tuple(range(first, first + threads))
                    for _ in range(threads):
                        cpus.append(CpuInfo(cpu_id, True, s, 0, n * clusters + cl, core_id, node, sibs))
                        node_cpus.setdefault(node, []).append(cpu_id)
                        cpu_id += 1
    n_nodes = sockets * nodes_per_socket
    mem = draw(stg.integers(4096, 65536))
    nodes = tuple(
        NumaNode(i, tuple(node_cpus[i]), mem * 1024, mem * 1024,
                 tuple(10 if i == j else (12 if i // nodes_per_socket == j // nodes_per_socket else 20) for j in range(n_nodes)),
                 (HugePagePool(2048, 512, 512),))
        for i in range(n_nodes)
    )
    return HostTopology("x86_64", "GenuineIntel", "synthetic", None, "vmx", sockets, 1, clusters, cores, threads,
                        tuple(cpus), tuple(c.id for c in cpus), nodes, (), (HugePagePool(2048, 512 * n_nodes, 512 * n_nodes),),
                        mem * 1024 * n_nodes)


vm_requests = stg.lists(
    stg.tuples(stg.integers(1, 12), stg.integers(64, 8192), stg.booleans(), stg.booleans()), min_size=1, max_size=25)
