/*
 * Host CPU topology walk for cna_agent._native.
 *
 * Why C at all: a topology probe reads a few small sysfs files per CPU and per cache
 * index (about 2,000 files on a 96-CPU Kunpeng host, 40,000 on an 8192-CPU one); doing the
 * open/read/close loop here instead of through Python's io stack is the whole gain. The
 * other reason is cpuid/MIDR, which Python cannot read at all.
 *
 * Contract (shared with the pure-Python twin in cna_agent/host/topology/pyscan.py, which must give
 * identical results on the same tree):
 *   - every path is under `root` (a recorded tree in tests, "/" on a live host);
 *   - output is plain data written into caller-owned buffers; nothing is allocated for the
 *     caller and no pointer into C memory survives the call;
 *   - counts are always reported, even past a buffer's capacity, and the call then returns
 *     -E2BIG so the caller can retry once with exact sizes;
 *   - errors are negative errno values; 0 is success.
 */
#ifndef CNA_TOPOLOGY_H
#define CNA_TOPOLOGY_H

#include <stdint.h>

/* Largest CPU id + 1 we accept (Linux NR_CPUS on distribution arm64/x86 kernels is <= 8192). */
#define CNA_TOPO_MAX_CPUS 8192
/* cache/indexK directories examined per CPU. */
#define CNA_TOPO_MAX_CACHE_INDEX 16

/* Cache type codes (sysfs "type" text -> int). */
#define CNA_CACHE_OTHER 0
#define CNA_CACHE_DATA 1
#define CNA_CACHE_INSTRUCTION 2
#define CNA_CACHE_UNIFIED 3

/* One present CPU (a cpuN directory exists). Topology ids are -1 when the file is absent. */
struct cna_cpu_raw {
    int32_t id;
    int32_t online;
    int32_t package;  /* topology/physical_package_id */
    int32_t die;      /* topology/die_id (x86/s390 only) */
    int32_t cluster;  /* topology/cluster_id (Linux >= 5.16; x86 may report 65535) */
    int32_t core;     /* topology/core_id */
    int32_t sib_off;  /* thread_siblings_list, as ints[sib_off .. sib_off+sib_len) */
    int32_t sib_len;
    int32_t has_midr; /* regs/identification/midr_el1 was readable */
    int32_t reserved;
    uint64_t midr;
};

/* One cache instance, reported once: by the first CPU (ascending id) that it covers. */
struct cna_cache_raw {
    int32_t level;
    int32_t type;     /* CNA_CACHE_* */
    int64_t size_kib;
    int32_t cpus_off; /* shared_cpu_list, as ints[cpus_off .. cpus_off+cpus_len) */
    int32_t cpus_len;
};

struct cna_topo_buf {
    struct cna_cpu_raw *cpus;
    int32_t cpus_cap;
    int32_t n_cpus;
    struct cna_cache_raw *caches;
    int32_t caches_cap;
    int32_t n_caches;
    int32_t *ints;
    int32_t ints_cap;
    int32_t n_ints;
};

int cna_topo_scan(const char *root, struct cna_topo_buf *buf);
int cna_parse_cpulist(const char *text, int32_t *out, int32_t cap, int32_t *n_out);
int cna_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t *out4);
int cna_read_midr_self(uint64_t *out);

#endif
