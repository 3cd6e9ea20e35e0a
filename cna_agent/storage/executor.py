"""The storage subsystem's own bounded pool (a BlockingPool named "storage").

Why separate from libvirt's pool: qemu-img on a SAN LUN, an iSCSI login or a SCSI scan can
hang for minutes when the array stops answering. Those calls get ``[storage]
executor_threads`` threads of their own, so VM list/get/stats (libvirt's pool, the event loop)
keep answering. The caller's await ends at the deadline with DEADLINE_EXCEEDED even when the
thread itself is still stuck in the kernel; a stuck thread occupies one slot until it returns,
and ``busy``/``stuck`` say how many there are (exported as the ``cna_agent_blocking_pool_*``
metrics). The semantics are BlockingPool's (cna_agent.blocking).
"""

from __future__ import annotations

from cna_agent.blocking import BlockingPool


class StorageExecutor(BlockingPool):
    """``threads`` threads named cna-storage-N, ``default_timeout`` seconds per call unless
    the call says otherwise."""

    def __init__(self, threads: int, default_timeout: float, *, name: str = "storage") -> None:
        super().__init__(name, threads, default_timeout, hint="storage not answering?")

    @property
    def threads(self) -> int:
        return self.size
