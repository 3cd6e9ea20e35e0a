/*
 * Thread affinity, per-thread CPU accounting and NUMA memory placement for cna_agent._native.
 *
 * Why C: re-pinning every thread of a few hundred QEMU processes after CPUs go offline (or a
 * dedicated VM arrives and shrinks the shared pool) means thousands of sched_setaffinity
 * calls and /proc reads; one call into C per batch removes the per-thread Python overhead
 * (os.sched_setaffinity builds a set, converts it to a mask, raises per failure). numa_maps
 * of a big guest runs to tens of thousands of lines, parsed here without Python strings.
 *
 * Contract (the pure-Python twin in cna_agent/host/affinity.py gives identical results):
 *   - plain data in caller-owned buffers; nothing allocated for the caller;
 *   - every index into a buffer is bounds-checked against its capacity; counts are reported
 *     even past the capacity and the call then returns -E2BIG (retry with exact sizes);
 *   - per-item failures (a thread that exited) go into an errno array, never abort a batch;
 *   - whole-call errors are negative errno values; >= 0 is success.
 */
#ifndef CNA_AFFINITY_H
#define CNA_AFFINITY_H

#include <stdint.h>

/* Highest NUMA node id + 1 we account memory for (Linux MAX_NUMNODES on big configs). */
#define CNA_AFF_MAX_NODES 1024

/* One thread as /proc/<pid>/task/<tid>/stat reports it. */
struct cna_thread_stat {
    int32_t tid;
    int32_t last_cpu;   /* field 39 "processor": the CPU it last ran on */
    uint64_t utime;     /* field 14, clock ticks */
    uint64_t stime;     /* field 15, clock ticks */
    char state;         /* field 3: R, S, D, Z, ... */
    char comm[16];      /* field 2 without the parentheses, NUL-terminated (TASK_COMM_LEN) */
    char pad[7];
};

/*
 * Threads of many processes: for each pids[i], the numeric entries of /proc/<pid>/task are
 * appended to tids[] with owner[k] = i (index into pids). A process that vanished is skipped
 * and gets errs[i] = errno. Returns 0, or -E2BIG with *n_out = the count needed.
 */
int cna_aff_list_tasks(const int32_t *pids, int32_t n_pids, int32_t *tids, int32_t *owner,
                       int32_t cap, int32_t *n_out, int32_t *errs);

/*
 * sched_setaffinity for n tids: thread k gets masks[mask_idx[k] * mask_bytes ...]. errs[k] is
 * 0 or the errno. Returns the number of threads set, or a negative errno for bad arguments
 * (a mask_idx outside 0..n_masks-1, mask_bytes not a positive multiple of 8).
 */
int cna_aff_set(const int32_t *tids, int32_t n, const uint8_t *masks, int32_t n_masks,
                int32_t mask_bytes, const int32_t *mask_idx, int32_t *errs);

/*
 * Re-pin every thread of many processes in one call: for each pids[i], every entry of
 * /proc/<pid>/task gets masks[mask_idx[i] * mask_bytes ...]. done[i] counts its threads pinned;
 * pid_errs[i] is the errno when the process could not be listed (gone). Threads that failed
 * are stored as (failed_tids[k], failed_errs[k]) up to failed_cap; *n_failed counts them all
 * (more than failed_cap: the caller re-checks). Returns the total pinned, or a negative errno
 * for bad arguments (checked before anything changes).
 */
int cna_aff_pin_tasks(const int32_t *pids, int32_t n_pids, const uint8_t *masks, int32_t n_masks,
                      int32_t mask_bytes, const int32_t *mask_idx, int32_t *done, int32_t *pid_errs,
                      int32_t *failed_tids, int32_t *failed_errs, int32_t failed_cap, int32_t *n_failed);

/*
 * sched_getaffinity for n tids into out[k * mask_bytes ...] (mask_bytes a multiple of 8 and
 * large enough for the kernel's nr_cpu_ids). errs[k] is 0 or the errno. Returns the number read.
 */
int cna_aff_get(const int32_t *tids, int32_t n, uint8_t *out, int32_t mask_bytes, int32_t *errs);

/*
 * /proc/<pid>/task/<tid>/stat of n threads of one process. errs[k] is 0 or the errno
 * (ENOENT: the thread exited; EPROTO: unparsable). Returns the number read.
 */
int cna_aff_thread_stats(int32_t pid, const int32_t *tids, int32_t n, struct cna_thread_stat *out,
                         int32_t *errs);

/*
 * Resident memory of a process per NUMA node from /proc/<pid>/numa_maps: for every mapping,
 * each "N<node>=<pages>" times its "kernelpagesize_kB=" (4 when absent) is added to
 * kib[node]. kib[] has n_nodes entries (zeroed here); pages on nodes >= n_nodes are summed in
 * *overflow_kib. Returns the number of mappings read, or a negative errno.
 */
int cna_aff_numa_maps(int32_t pid, int64_t *kib, int32_t n_nodes, int64_t *overflow_kib);

#endif
