/*
 * Batch thread affinity, per-thread stats and NUMA memory placement (see affinity.h for the
 * contract). Linux only: sched_{set,get}affinity on thread ids and /proc.
 */
#define _GNU_SOURCE
#include "affinity.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

/* Parse a non-negative decimal of at most 18 digits (no overflow); -1 when not one. */
static int64_t parse_u(const char *s, size_t len)
{
    int64_t v = 0;
    if (len == 0 || len > 18)
        return -1;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v;
}

int cna_aff_list_tasks(const int32_t *pids, int32_t n_pids, int32_t *tids, int32_t *owner,
                       int32_t cap, int32_t *n_out, int32_t *errs)
{
    char path[64];
    int32_t n = 0;
    if (n_pids < 0 || cap < 0 || !n_out)
        return -EINVAL;
    for (int32_t i = 0; i < n_pids; i++) {
        errs[i] = 0;
        if (pids[i] <= 0) {
            errs[i] = EINVAL;
            continue;
        }
        snprintf(path, sizeof(path), "/proc/%d/task", (int)pids[i]);
        DIR *dir = opendir(path);
        if (!dir) {
            errs[i] = errno;
            continue;
        }
        struct dirent *de;
        while ((de = readdir(dir)) != NULL) {
            int64_t tid = parse_u(de->d_name, strlen(de->d_name));
            if (tid <= 0 || tid > INT32_MAX)
                continue; /* "." and ".." */
            if (n < cap) {
                tids[n] = (int32_t)tid;
                owner[n] = i;
            }
            n++;
        }
        closedir(dir);
    }
    *n_out = n;
    return n > cap ? -E2BIG : 0;
}

static int mask_bytes_ok(int32_t mask_bytes)
{
    return mask_bytes > 0 && mask_bytes % 8 == 0 && mask_bytes <= (1 << 20);
}

int cna_aff_set(const int32_t *tids, int32_t n, const uint8_t *masks, int32_t n_masks,
                int32_t mask_bytes, const int32_t *mask_idx, int32_t *errs)
{
    int done = 0;
    if (n < 0 || n_masks < 0 || !mask_bytes_ok(mask_bytes))
        return -EINVAL;
    for (int32_t k = 0; k < n; k++) /* validate everything before changing anything */
        if (mask_idx[k] < 0 || mask_idx[k] >= n_masks)
            return -ERANGE;
    for (int32_t k = 0; k < n; k++) {
        const cpu_set_t *set = (const cpu_set_t *)(masks + (size_t)mask_idx[k] * (size_t)mask_bytes);
        /* The raw syscall: glibc's wrapper is the same call, but this keeps the semantics
         * (a tid, not a pid, and no glibc-side size checks) explicit. */
        if (syscall(SYS_sched_setaffinity, (pid_t)tids[k], (size_t)mask_bytes, set) == 0) {
            errs[k] = 0;
            done++;
        } else {
            errs[k] = errno;
        }
    }
    return done;
}

int cna_aff_pin_tasks(const int32_t *pids, int32_t n_pids, const uint8_t *masks, int32_t n_masks,
                      int32_t mask_bytes, const int32_t *mask_idx, int32_t *done, int32_t *pid_errs,
                      int32_t *failed_tids, int32_t *failed_errs, int32_t failed_cap, int32_t *n_failed)
{
    char path[64];
    int total = 0;
    int32_t nf = 0;
    if (n_pids < 0 || n_masks < 0 || failed_cap < 0 || !n_failed || !mask_bytes_ok(mask_bytes))
        return -EINVAL;
    for (int32_t i = 0; i < n_pids; i++)
        if (mask_idx[i] < 0 || mask_idx[i] >= n_masks || pids[i] <= 0)
            return -ERANGE;
    for (int32_t i = 0; i < n_pids; i++) {
        const cpu_set_t *set = (const cpu_set_t *)(masks + (size_t)mask_idx[i] * (size_t)mask_bytes);
        done[i] = 0;
        pid_errs[i] = 0;
        snprintf(path, sizeof(path), "/proc/%d/task", (int)pids[i]);
        DIR *dir = opendir(path);
        if (!dir) {
            pid_errs[i] = errno;
            continue;
        }
        struct dirent *de;
        while ((de = readdir(dir)) != NULL) {
            int64_t tid = parse_u(de->d_name, strlen(de->d_name));
            if (tid <= 0 || tid > INT32_MAX)
                continue;
            if (syscall(SYS_sched_setaffinity, (pid_t)tid, (size_t)mask_bytes, set) == 0) {
                done[i]++;
                total++;
            } else {
                if (nf < failed_cap) {
                    failed_tids[nf] = (int32_t)tid;
                    failed_errs[nf] = errno;
                }
                if (nf < INT32_MAX)
                    nf++;
            }
        }
        closedir(dir);
    }
    *n_failed = nf;
    return total;
}

int cna_aff_get(const int32_t *tids, int32_t n, uint8_t *out, int32_t mask_bytes, int32_t *errs)
{
    int done = 0;
    if (n < 0 || !mask_bytes_ok(mask_bytes))
        return -EINVAL;
    for (int32_t k = 0; k < n; k++) {
        uint8_t *dst = out + (size_t)k * (size_t)mask_bytes;
        memset(dst, 0, (size_t)mask_bytes);
        /* The raw syscall returns the number of bytes the kernel wrote (its cpumask size). */
        long rc = syscall(SYS_sched_getaffinity, (pid_t)tids[k], (size_t)mask_bytes, dst);
        if (rc >= 0) {
            errs[k] = 0;
            done++;
        } else {
            errs[k] = errno;
        }
    }
    return done;
}

/* Read a whole small file into buf (NUL-terminated); length or -errno. */
static ssize_t read_small(const char *path, char *buf, size_t cap)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    size_t len = 0;
    while (len + 1 < cap) {
        ssize_t r = read(fd, buf + len, cap - 1 - len);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            int e = errno;
            close(fd);
            return -e;
        }
        if (r == 0)
            break;
        len += (size_t)r;
    }
    close(fd);
    buf[len] = '\0';
    return (ssize_t)len;
}

/* Fields of one stat line; 0 or EPROTO. */
static int parse_stat(const char *buf, size_t len, struct cna_thread_stat *st)
{
    const char *open_p = memchr(buf, '(', len);
    const char *close_p = NULL;
    /* comm may itself contain ')' and spaces: the last ')' ends it. */
    for (const char *p = buf + len; p > buf; p--)
        if (p[-1] == ')') {
            close_p = p - 1;
            break;
        }
    if (!open_p || !close_p || close_p < open_p)
        return EPROTO;
    size_t clen = (size_t)(close_p - open_p - 1);
    if (clen > sizeof(st->comm) - 1)
        clen = sizeof(st->comm) - 1;
    memset(st->comm, 0, sizeof(st->comm));
    memcpy(st->comm, open_p + 1, clen);
    /* After ") ": field 3 is the state, then space-separated numbers; count from 3. */
    const char *p = close_p + 1;
    const char *end = buf + len;
    int field = 2;
    int seen = 0;
    while (p < end) {
        while (p < end && *p == ' ')
            p++;
        if (p >= end || *p == '\n')
            break;
        const char *tok = p;
        while (p < end && *p != ' ' && *p != '\n')
            p++;
        size_t tlen = (size_t)(p - tok);
        field++;
        if (field == 3) {
            st->state = tok[0];
            seen |= 1;
        } else if (field == 14 || field == 15 || field == 39) {
            int64_t v = parse_u(tok, tlen);
            if (v < 0)
                return EPROTO;
            if (field == 14) {
                st->utime = (uint64_t)v;
                seen |= 2;
            } else if (field == 15) {
                st->stime = (uint64_t)v;
                seen |= 4;
            } else {
                if (v > INT32_MAX)
                    return EPROTO;
                st->last_cpu = (int32_t)v;
                seen |= 8;
                break;
            }
        }
    }
    return seen == 15 ? 0 : EPROTO;
}

int cna_aff_thread_stats(int32_t pid, const int32_t *tids, int32_t n, struct cna_thread_stat *out,
                         int32_t *errs)
{
    char path[80];
    char buf[1024]; /* a stat line is < 400 bytes; comm is at most 15 */
    int done = 0;
    if (n < 0 || pid <= 0)
        return -EINVAL;
    for (int32_t k = 0; k < n; k++) {
        struct cna_thread_stat *st = &out[k];
        memset(st, 0, sizeof(*st));
        st->tid = tids[k];
        st->last_cpu = -1;
        snprintf(path, sizeof(path), "/proc/%d/task/%d/stat", (int)pid, (int)tids[k]);
        ssize_t len = read_small(path, buf, sizeof(buf));
        if (len < 0) {
            errs[k] = (int32_t)-len;
            continue;
        }
        errs[k] = parse_stat(buf, (size_t)len, st);
        if (errs[k] == 0)
            done++;
    }
    return done;
}

/* One numa_maps line: walk tokens from the end (a file name may contain " N0=5"). */
static void numa_line(const char *line, size_t len, int64_t *kib, int32_t n_nodes, int64_t *overflow)
{
    while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == ' '))
        len--;
    size_t end = len;
    int64_t page_kib = -1;
    /* (node, pages) pairs collected first; the page size is the last token. */
    while (end > 0) {
        size_t start = end;
        while (start > 0 && line[start - 1] != ' ')
            start--;
        const char *tok = line + start;
        size_t tlen = end - start;
        if (page_kib < 0) {
            static const char key[] = "kernelpagesize_kB=";
            if (tlen <= sizeof(key) - 1 || memcmp(tok, key, sizeof(key) - 1) != 0)
                return; /* no pages counted in this mapping: the kernel printed no N fields */
            page_kib = parse_u(tok + sizeof(key) - 1, tlen - (sizeof(key) - 1));
            if (page_kib < 0)
                return;
        } else {
            const char *eq = memchr(tok, '=', tlen);
            if (tlen < 4 || tok[0] != 'N' || !eq)
                return; /* first token before the N fields: done */
            int64_t node = parse_u(tok + 1, (size_t)(eq - tok - 1));
            int64_t pages = parse_u(eq + 1, tlen - (size_t)(eq - tok) - 1);
            if (node < 0 || pages < 0)
                return;
            if (node < n_nodes)
                kib[node] += pages * page_kib;
            else
                *overflow += pages * page_kib;
        }
        if (start == 0)
            return;
        end = start - 1;
    }
}

int cna_aff_numa_maps(int32_t pid, int64_t *kib, int32_t n_nodes, int64_t *overflow_kib)
{
    char path[64];
    if (pid <= 0 || n_nodes < 0 || n_nodes > CNA_AFF_MAX_NODES || !overflow_kib)
        return -EINVAL;
    for (int32_t i = 0; i < n_nodes; i++)
        kib[i] = 0;
    *overflow_kib = 0;
    snprintf(path, sizeof(path), "/proc/%d/numa_maps", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f)
        return -errno;
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    int lines = 0;
    errno = 0;
    while ((len = getline(&line, &cap, f)) >= 0) {
        numa_line(line, (size_t)len, kib, n_nodes, overflow_kib);
        lines++;
    }
    int err = ferror(f) ? (errno ? errno : EIO) : 0;
    free(line);
    fclose(f);
    return err ? -err : lines;
}
