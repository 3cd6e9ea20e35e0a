"""The backing chain of a qcow2 image, read from the headers (no qemu-img exec).

Why: before a VM starts under an unprivileged QEMU the agent must open the directories on the way
to every image of a disk's chain (qemu_access), on each start, for each disk: a header read is
a few hundred bytes, where ``qemu-img info --backing-chain`` is a process per disk. Only the
fields the qcow2 spec fixes since version 2 are read (magic, backing file offset and size); a
file that is not qcow2 has no chain.
"""

from __future__ import annotations

import os
import struct

QCOW2_MAGIC = b"QFI\xfb"
#: The header's backing file name is at most 1023 bytes (QEMU's limit).
MAX_NAME = 1023
#: Longer chains than this are not followed (QEMU itself refuses loops; a chain this deep is a
#: mistake, not a layout).
MAX_DEPTH = 32


def backing_file(path: str) -> str | None:
    """The backing file named in ``path``'s qcow2 header, made absolute against the image's own
    directory (how QEMU resolves a relative name); None when there is none or it is not qcow2."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
            if len(head) < 20 or head[:4] != QCOW2_MAGIC:
                return None
            offset, size = struct.unpack(">QI", head[8:20])
            if not offset or not size or size > MAX_NAME:
                return None
            f.seek(offset)
            raw = f.read(size)
    except OSError:
        return None
    name = raw.decode("utf-8", "replace")
    if not name or name.startswith(("json:", "nbd:", "iscsi:")) or "://" in name:
        return None  # a protocol, not a file on this host
    return name if os.path.isabs(name) else os.path.join(os.path.dirname(path), name)


def backing_chain(path: str) -> list[str]:
    """Every file below ``path`` in its chain, nearest first (``path`` itself not included)."""
    chain: list[str] = []
    seen = {os.path.realpath(path)}
    cur = path
    while len(chain) < MAX_DEPTH:
        nxt = backing_file(cur)
        if nxt is None or os.path.realpath(nxt) in seen:
            break
        chain.append(nxt)
        seen.add(os.path.realpath(nxt))
        cur = nxt
    return chain
