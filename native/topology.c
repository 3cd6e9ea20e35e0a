/*
 * Host CPU topology walk; see topology.h for the contract and why this is in C.
 *
 * Safety rules kept throughout: every path is built with snprintf and checked for
 * truncation, every text buffer has an explicit capacity, CPU ids are range-checked against
 * CNA_TOPO_MAX_CPUS before they index a bitmap, and output arrays are written only below
 * their capacity (counting continues past it so the caller learns the size it needs).
 */
#define _GNU_SOURCE
#include "topology.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__aarch64__)
#include <sys/auxv.h>
#ifndef HWCAP_CPUID
#define HWCAP_CPUID (1UL << 11)
#endif
#endif

#define WORDS ((CNA_TOPO_MAX_CPUS + 63) / 64)
/* A cpulist of 8192 alternating CPUs is ~20 KiB; sysfs attributes are at most one page
 * (64 KiB on 64K-page arm64 kernels). */
#define TEXT_CAP (128 * 1024)
/* (level 0..7) x (type 0..3) keys for the "cache instance already reported" bitmaps. */
#define CACHE_KEYS 32

typedef uint64_t cpumask_t[WORDS];

static inline void mask_set(uint64_t *m, long bit) { m[bit / 64] |= 1ULL << (bit % 64); }
static inline int mask_test(const uint64_t *m, long bit) { return (m[bit / 64] >> (bit % 64)) & 1; }

/* Read a whole small file relative to dirfd into buf (NUL-terminated, trailing whitespace
 * trimmed). Returns length or -errno; -E2BIG if it does not fit. */
static int read_text(int dirfd, const char *rel, char *buf, size_t cap)
{
    int fd = openat(dirfd, rel, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    size_t len = 0;
    for (;;) {
        if (len + 1 >= cap) {
            char probe;
            ssize_t extra = read(fd, &probe, 1);
            close(fd);
            if (extra != 0)
                return -E2BIG;
            break;
        }
        ssize_t r = read(fd, buf + len, cap - 1 - len);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            int err = -errno;
            close(fd);
            return err;
        }
        len += (size_t)r;
        /* A short read is EOF for sysfs attributes (one show() buffer) and for regular
         * files; stopping here saves the third syscall per file, a third of the walk. */
        if (r == 0 || len + 1 < cap) {
            close(fd);
            break;
        }
    }
    while (len > 0 && isspace((unsigned char)buf[len - 1]))
        len--;
    buf[len] = '\0';
    return (int)len;
}

/* Read one decimal integer (sysfs ids, "-1" included). Returns 0 or -errno. */
static int read_int(int dirfd, const char *rel, long long *out)
{
    char buf[64];
    int n = read_text(dirfd, rel, buf, sizeof buf);
    if (n < 0)
        return n;
    char *end;
    errno = 0;
    long long v = strtoll(buf, &end, 10);
    if (errno || end == buf || *end != '\0')
        return -EINVAL;
    *out = v;
    return 0;
}

static int32_t read_id(int dirfd, const char *rel)
{
    long long v;
    if (read_int(dirfd, rel, &v) < 0 || v < INT32_MIN || v > INT32_MAX)
        return -1;
    return (int32_t)v;
}

/* Parse the kernel's cpulist syntax ("0-3,8,10-11", possibly empty) into a bitmap.
 * Returns 0, -EINVAL on bad syntax, -ERANGE on ids >= CNA_TOPO_MAX_CPUS. */
static int cpulist_to_mask(const char *s, uint64_t *mask)
{
    memset(mask, 0, sizeof(cpumask_t));
    while (isspace((unsigned char)*s))
        s++;
    if (*s == '\0')
        return 0;
    for (;;) {
        if (!isdigit((unsigned char)*s))
            return -EINVAL;
        char *end;
        errno = 0;
        unsigned long lo = strtoul(s, &end, 10), hi = lo;
        if (errno)
            return -ERANGE;
        s = end;
        if (*s == '-') {
            s++;
            if (!isdigit((unsigned char)*s))
                return -EINVAL;
            hi = strtoul(s, &end, 10);
            if (errno)
                return -ERANGE;
            s = end;
        }
        if (hi < lo)
            return -EINVAL;
        if (hi >= CNA_TOPO_MAX_CPUS)
            return -ERANGE;
        for (unsigned long c = lo; c <= hi; c++)
            mask_set(mask, (long)c);
        while (isspace((unsigned char)*s))
            s++;
        if (*s == '\0')
            return 0;
        if (*s != ',')
            return -EINVAL;
        s++;
    }
}

/* Append the set bits of mask (ascending) to b->ints; returns how many were set. */
static int32_t mask_emit(const uint64_t *mask, struct cna_topo_buf *b)
{
    int32_t count = 0;
    for (int w = 0; w < WORDS; w++) {
        uint64_t bits = mask[w];
        while (bits) {
            int bit = __builtin_ctzll(bits);
            bits &= bits - 1;
            if (b->n_ints < b->ints_cap)
                b->ints[b->n_ints] = w * 64 + bit;
            b->n_ints++;
            count++;
        }
    }
    return count;
}

static int cache_type_code(const char *t)
{
    if (strcmp(t, "Data") == 0)
        return CNA_CACHE_DATA;
    if (strcmp(t, "Instruction") == 0)
        return CNA_CACHE_INSTRUCTION;
    if (strcmp(t, "Unified") == 0)
        return CNA_CACHE_UNIFIED;
    return CNA_CACHE_OTHER;
}

/* "512K" / "24576K" / "1M" -> KiB; -1 when unparseable. */
static int64_t parse_size_kib(const char *s)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || v < 0)
        return -1;
    switch (*end) {
    case '\0':
        return v / 1024;
    case 'K':
        return v;
    case 'M':
        return v * 1024;
    case 'G':
        return v * 1024 * 1024;
    default:
        return -1;
    }
}

/* No "possible" file: fall back to the cpuN entries that exist. */
static int mask_from_dir(int cpudir, uint64_t *mask)
{
    int fd = dup(cpudir);
    if (fd < 0)
        return -errno;
    DIR *d = fdopendir(fd);
    if (!d) {
        int err = -errno;
        close(fd);
        return err;
    }
    memset(mask, 0, sizeof(cpumask_t));
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        const char *n = e->d_name;
        if (strncmp(n, "cpu", 3) != 0 || !isdigit((unsigned char)n[3]))
            continue;
        char *end;
        unsigned long id = strtoul(n + 3, &end, 10);
        if (*end != '\0')
            continue;
        if (id >= CNA_TOPO_MAX_CPUS) {
            closedir(d);
            return -ERANGE;
        }
        mask_set(mask, (long)id);
    }
    closedir(d);
    return 0;
}

#define REL(...)                                                               \
    do {                                                                       \
        int _n = snprintf(rel, sizeof rel, __VA_ARGS__);                       \
        if (_n < 0 || (size_t)_n >= sizeof rel) {                              \
            rc = -ENAMETOOLONG;                                                \
            goto out;                                                          \
        }                                                                      \
    } while (0)

int cna_topo_scan(const char *root, struct cna_topo_buf *b)
{
    if (!root || !b || b->cpus_cap < 0 || b->caches_cap < 0 || b->ints_cap < 0 ||
        (b->cpus_cap && !b->cpus) || (b->caches_cap && !b->caches) ||
        (b->ints_cap && !b->ints))
        return -EINVAL;
    b->n_cpus = b->n_caches = b->n_ints = 0;

    char path[PATH_MAX];
    int n = snprintf(path, sizeof path, "%s/sys/devices/system/cpu", root);
    if (n < 0 || (size_t)n >= sizeof path)
        return -ENAMETOOLONG;
    int cpudir = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (cpudir < 0)
        return -errno;

    int rc = 0;
    int cfd = -1;
    char rel[128];
    uint64_t *possible = calloc(1, sizeof(cpumask_t));
    uint64_t *online = calloc(1, sizeof(cpumask_t));
    uint64_t *tmp = calloc(1, sizeof(cpumask_t));
    uint64_t *covered = calloc(CACHE_KEYS, sizeof(cpumask_t));
    char *text = malloc(TEXT_CAP);
    if (!possible || !online || !tmp || !covered || !text) {
        rc = -ENOMEM;
        goto out;
    }

    if (read_text(cpudir, "possible", text, TEXT_CAP) >= 0)
        rc = cpulist_to_mask(text, possible);
    else
        rc = mask_from_dir(cpudir, possible);
    if (rc < 0)
        goto out;
    int have_online = read_text(cpudir, "online", text, TEXT_CAP) >= 0;
    if (have_online && (rc = cpulist_to_mask(text, online)) < 0)
        goto out;

    for (int id = 0; id < CNA_TOPO_MAX_CPUS; id++) {
        if (!mask_test(possible, id))
            continue;
        REL("cpu%d", id);
        /* One O_PATH directory fd per CPU: doubles as the "present" check and keeps
         * every later lookup to a short relative path. */
        cfd = openat(cpudir, rel, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (cfd < 0)
            continue;

        struct cna_cpu_raw c = {0};
        c.id = id;
        c.online = have_online ? mask_test(online, id) : 1;
        REL("topology/physical_package_id");
        c.package = read_id(cfd, rel);
        REL("topology/die_id");
        c.die = read_id(cfd, rel);
        REL("topology/cluster_id");
        c.cluster = read_id(cfd, rel);
        REL("topology/core_id");
        c.core = read_id(cfd, rel);
        c.sib_off = b->n_ints;
        REL("topology/thread_siblings_list");
        if (read_text(cfd, rel, text, TEXT_CAP) >= 0 && cpulist_to_mask(text, tmp) == 0)
            c.sib_len = mask_emit(tmp, b);
        REL("regs/identification/midr_el1");
        if (read_text(cfd, rel, text, 64) >= 0) {
            char *end;
            errno = 0;
            unsigned long long v = strtoull(text, &end, 16);
            if (!errno && end != text && *end == '\0') {
                c.midr = v;
                c.has_midr = 1;
            }
        }
        if (b->n_cpus < b->cpus_cap)
            b->cpus[b->n_cpus] = c;
        b->n_cpus++;

        for (int k = 0; k < CNA_TOPO_MAX_CACHE_INDEX; k++) {
            long long level;
            REL("cache/index%d/level", k);
            if (read_int(cfd, rel, &level) < 0)
                break; /* indexes are dense; the first gap ends the list */
            REL("cache/index%d/type", k);
            if (read_text(cfd, rel, text, 64) < 0)
                continue;
            int type = cache_type_code(text);
            int key = (int)(level & 7) * 4 + type;
            if (mask_test(covered + (size_t)key * WORDS, id))
                continue; /* already reported by a lower CPU sharing it */
            REL("cache/index%d/size", k);
            int64_t size = read_text(cfd, rel, text, 64) >= 0 ? parse_size_kib(text) : -1;
            REL("cache/index%d/shared_cpu_list", k);
            if (read_text(cfd, rel, text, TEXT_CAP) < 0 || cpulist_to_mask(text, tmp) < 0) {
                memset(tmp, 0, sizeof(cpumask_t));
                mask_set(tmp, id);
            }
            uint64_t *cov = covered + (size_t)key * WORDS;
            for (int w = 0; w < WORDS; w++)
                cov[w] |= tmp[w];
            struct cna_cache_raw ci = {0};
            ci.level = (int32_t)level;
            ci.type = type;
            ci.size_kib = size;
            ci.cpus_off = b->n_ints;
            ci.cpus_len = mask_emit(tmp, b);
            if (b->n_caches < b->caches_cap)
                b->caches[b->n_caches] = ci;
            b->n_caches++;
        }
        close(cfd);
        cfd = -1;
    }
    if (b->n_cpus > b->cpus_cap || b->n_caches > b->caches_cap || b->n_ints > b->ints_cap)
        rc = -E2BIG;
    else
        rc = 0;

out:
    if (cfd >= 0)
        close(cfd);
    free(possible);
    free(online);
    free(tmp);
    free(covered);
    free(text);
    close(cpudir);
    return rc;
}

int cna_parse_cpulist(const char *text, int32_t *out, int32_t cap, int32_t *n_out)
{
    if (!text || !n_out || cap < 0 || (cap && !out))
        return -EINVAL;
    uint64_t *mask = calloc(1, sizeof(cpumask_t));
    if (!mask)
        return -ENOMEM;
    int rc = cpulist_to_mask(text, mask);
    int32_t n = 0;
    if (rc == 0) {
        for (int id = 0; id < CNA_TOPO_MAX_CPUS; id++) {
            if (!mask_test(mask, id))
                continue;
            if (n < cap)
                out[n] = id;
            n++;
        }
        if (n > cap)
            rc = -E2BIG;
    }
    *n_out = n;
    free(mask);
    return rc;
}

int cna_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t *out4)
{
    if (!out4)
        return -EINVAL;
#if defined(__x86_64__) || defined(__i386__)
    unsigned int max = __get_cpuid_max(leaf & 0x80000000u, NULL);
    if (max == 0 || leaf > max)
        return -EINVAL;
    unsigned int a, b, c, d;
    __cpuid_count(leaf, subleaf, a, b, c, d);
    out4[0] = a;
    out4[1] = b;
    out4[2] = c;
    out4[3] = d;
    return 0;
#else
    (void)leaf;
    (void)subleaf;
    return -ENOSYS;
#endif
}

int cna_read_midr_self(uint64_t *out)
{
    if (!out)
        return -EINVAL;
#if defined(__aarch64__)
    /* EL0 reads of MIDR_EL1 trap and are emulated by the kernel only when it advertises
     * HWCAP_CPUID (Linux >= 4.11); without that check the mrs would raise SIGILL. */
    if (!(getauxval(AT_HWCAP) & HWCAP_CPUID))
        return -ENOTSUP;
    uint64_t v;
    __asm__ volatile("mrs %0, midr_el1" : "=r"(v));
    *out = v;
    return 0;
#else
    return -ENOSYS;
#endif
}
