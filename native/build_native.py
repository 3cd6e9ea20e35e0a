"""cffi builder for ``cna_agent._native`` (out-of-line API mode, the argon2-cffi-bindings model).

Two ways in, one description of the module:

* setuptools: ``setup.py`` lists ``cffi_modules=["native/build_native.py:ffibuilder"]`` and
  runs this file with cwd = the repository root; cffi's hook compiles ``ffibuilder``.
* developers: ``python native/build_native.py`` compiles in place and drops the .so into
  ``cna_agent/`` so ``from cna_agent._native import ffi, lib`` works from a source checkout.

To add native code (batch affinity, get_mempolicy, ...): append the .c file to
``C_SOURCES``, its prototypes to ``CDEF`` and its header to ``HEADERS``. Keep functions
plain-data in, plain-data out (no Python objects in C), and keep a pure-Python twin.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import cffi

NATIVE_DIR = Path(__file__).resolve().parent
REPO_ROOT = NATIVE_DIR.parent
MODULE_NAME = "cna_agent._native"

# C translation units compiled into the module, relative to this directory.
C_SOURCES: list[str] = ["topology.c", "affinity.c"]
# Headers the generated wrapper includes (they carry the prototypes and struct layouts).
HEADERS: list[str] = ["topology.h", "affinity.h"]

# What Python sees. Struct layouts must match the headers exactly (cffi checks field offsets
# at compile time in API mode, so a drift fails the build instead of corrupting memory).
CDEF = """
#define CNA_TOPO_MAX_CPUS 8192
#define CNA_TOPO_MAX_CACHE_INDEX 16
#define CNA_CACHE_OTHER 0
#define CNA_CACHE_DATA 1
#define CNA_CACHE_INSTRUCTION 2
#define CNA_CACHE_UNIFIED 3

struct cna_cpu_raw {
    int32_t id;
    int32_t online;
    int32_t package;
    int32_t die;
    int32_t cluster;
    int32_t core;
    int32_t sib_off;
    int32_t sib_len;
    int32_t has_midr;
    int32_t reserved;
    uint64_t midr;
};

struct cna_cache_raw {
    int32_t level;
    int32_t type;
    int64_t size_kib;
    int32_t cpus_off;
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

/* affinity.h */
#define CNA_AFF_MAX_NODES 1024

struct cna_thread_stat {
    int32_t tid;
    int32_t last_cpu;
    uint64_t utime;
    uint64_t stime;
    char state;
    char comm[16];
    char pad[7];
};

int cna_aff_list_tasks(const int32_t *pids, int32_t n_pids, int32_t *tids, int32_t *owner,
                       int32_t cap, int32_t *n_out, int32_t *errs);
int cna_aff_set(const int32_t *tids, int32_t n, const uint8_t *masks, int32_t n_masks,
                int32_t mask_bytes, const int32_t *mask_idx, int32_t *errs);
int cna_aff_pin_tasks(const int32_t *pids, int32_t n_pids, const uint8_t *masks, int32_t n_masks,
                      int32_t mask_bytes, const int32_t *mask_idx, int32_t *done, int32_t *pid_errs,
                      int32_t *failed_tids, int32_t *failed_errs, int32_t failed_cap, int32_t *n_failed);
int cna_aff_get(const int32_t *tids, int32_t n, uint8_t *out, int32_t mask_bytes, int32_t *errs);
int cna_aff_thread_stats(int32_t pid, const int32_t *tids, int32_t n, struct cna_thread_stat *out,
                         int32_t *errs);
int cna_aff_numa_maps(int32_t pid, int64_t *kib, int32_t n_nodes, int64_t *overflow_kib);
"""

EXTRA_COMPILE_ARGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"]


def _source_path(name: str, *, absolute: bool) -> str:
    """Path of a file in native/ as the compiler should see it.

    setuptools prefers sources relative to the setup.py directory (the cwd during a build,
    also inside pip's isolated copy of the tree); cffi's in-place ``compile()`` chdirs into
    its temp dir, so that path needs absolute names.
    """
    path = NATIVE_DIR / name
    if absolute:
        return str(path)
    try:
        return os.path.relpath(path, os.getcwd())
    except ValueError:  # different drive/mount semantics: fall back to absolute
        return str(path)


def make_ffibuilder(*, absolute_paths: bool = False) -> cffi.FFI:
    """Build a fresh FFI describing the module (set_source can be called once per FFI)."""
    builder = cffi.FFI()
    builder.cdef(CDEF)
    builder.set_source(
        MODULE_NAME,
        "".join(f'#include "{h}"\n' for h in HEADERS),
        sources=[_source_path(s, absolute=absolute_paths) for s in C_SOURCES],
        include_dirs=[str(NATIVE_DIR)],
        extra_compile_args=EXTRA_COMPILE_ARGS,
    )
    return builder


ffibuilder = make_ffibuilder()


def build_inplace(verbose: bool = False) -> Path:
    """Compile in a scratch directory and copy the extension into cna_agent/.

    The generated _native.c stays in the scratch directory so the source tree only gains
    the (gitignored) .so.
    """
    builder = make_ffibuilder(absolute_paths=True)
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    with tempfile.TemporaryDirectory(prefix="cna-native-") as tmp:
        built = Path(builder.compile(tmpdir=tmp, verbose=verbose))
        target = REPO_ROOT / "cna_agent" / f"_native{suffix}"
        tmp_target = target.with_name(target.name + ".tmp")
        shutil.copy2(built, tmp_target)
        # Atomic replace: a running interpreter that already mapped the old .so keeps it.
        os.replace(tmp_target, target)
    # A stale build under another suffix (e.g. the .abi3.so of `pip install -e .`) could
    # shadow or be shadowed by this one depending on import suffix order; keep exactly one.
    for other in target.parent.glob("_native.*.so"):
        if other != target:
            other.unlink()
    return target


if __name__ == "__main__":
    out = build_inplace(verbose="-v" in sys.argv[1:])
    print(out)
