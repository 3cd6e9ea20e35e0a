"""Reading one small sysfs/procfs file, the way every Python-side topology read does it.

Separate because both the pure-Python per-CPU scan and the per-node/host-wide readers use
these, and they must behave like the C reader in native/topology.c (same short-read rule,
same "unreadable means absent" answer) so the two probe paths agree on every tree.
"""

from __future__ import annotations

import os

__all__ = ["read_file", "read_head", "read_id", "read_int"]


def read_file(path: str) -> str | None:
    """Whole small file as text, None when unreadable (missing files are normal in sysfs)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            chunks.append(chunk)
            # A short read is EOF for sysfs attributes (one show() buffer) and regular
            # files; stopping there saves a syscall per file (same rule as the C reader).
            if len(chunk) < 65536:
                break
    except OSError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks).decode("ascii", "replace")


def read_head(path: str, limit: int) -> str | None:
    """First ``limit`` bytes: /proc/cpuinfo is generated per CPU (slowly on x86, where each
    record samples the clock), and only the first record is needed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, limit).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def read_id(path: str) -> int:
    """A topology id file as an int32, -1 when missing or not a number (the C reader's rule)."""
    text = read_file(path)
    if text is None:
        return -1
    try:
        value = int(text)
    except ValueError:
        return -1
    return value if -(2**31) <= value < 2**31 else -1


def read_int(path: str) -> int | None:
    """An integer file, None when missing or not a number."""
    text = read_file(path)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None
