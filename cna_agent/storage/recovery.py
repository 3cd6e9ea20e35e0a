"""Closing volume operations a crashed agent left open, decided from the datastore now.

Why it can be decided: every volume is produced under a temporary name and linked into place
only when complete and flushed (volumes.py ``_produce``/``_commit``), and the start-up sweep has
removed every temporary file before these run. So a volume present under its name is whole,
and one absent was not made (nothing partial is left). A create, clone, import or export
whose volume is there ends SUCCEEDED with the volume as it is; otherwise ABORTED saying that
nothing was left. A delete whose file is gone succeeded; a resize succeeded when the volume is
at least the size asked (recorded in the operation's metadata); a datastore rescan, which only
reads, ends ABORTED naming the datastore's health now. Nothing is redone.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from cna_agent.errors import CODES, AgentError
from cna_agent.operations import RecoveryHandler
from cna_agent.state.journal import OperationError, OperationRecord

if TYPE_CHECKING:
    from cna_agent.storage.service import StorageService

log = logging.getLogger(__name__)


class VolumeRecovery:
    def __init__(self, storage: "StorageService") -> None:
        self.storage = storage

    def handlers(self) -> dict[str, RecoveryHandler]:
        made = {kind: self.recover_made for kind in ("volume.create", "volume.clone", "volume.import", "volume.export")}
        return {**made, "volume.delete": self.recover_delete, "volume.resize": self.recover_resize,
                "datastore.rescan": self.recover_rescan}

    async def _info(self, volume_id: str) -> Any:
        """The volume as it is now, or None when it does not exist (or cannot be read)."""
        try:
            ref = self.storage._volume_ref(volume_id, "id", must_exist=True)
            return await self.storage.executor.run(lambda: self.storage.volumes.info(ref), timeout=120,
                                                   what=f"info of {volume_id}")
        except AgentError:
            return None

    async def recover_made(self, record: OperationRecord) -> Any:
        info = await self._info(record.target)
        if info is None:
            return OperationError(CODES["ABORTED"], f"the agent stopped before volume {record.target!r} was complete; it "
                                                    "was not created and its temporary file was removed (nothing was redone)")
        return await self.storage._volume_result(info)

    async def recover_delete(self, record: OperationRecord) -> Any:
        if await self._info(record.target) is None:
            return None
        return OperationError(CODES["ABORTED"], f"the agent stopped before volume {record.target!r} was deleted; it is "
                                                "still there (nothing was redone)")

    async def recover_resize(self, record: OperationRecord) -> Any:
        info = await self._info(record.target)
        want = int(record.metadata.get("new_size_bytes", "0") or 0)
        if info is not None and want and info.virtual_size >= want:
            return await self.storage._volume_result(info)
        size = f"{info.virtual_size} bytes" if info is not None else "gone"
        return OperationError(CODES["ABORTED"], f"the agent stopped while resizing volume {record.target!r}; it is {size} "
                                                f"now, not the {want} bytes asked (nothing was redone)")


    async def recover_rescan(self, record: OperationRecord) -> Any:
        """A rescan cut short. It only reads the array (and, with the kernel initiator, asks
        the SCSI layer to add the LUNs the array presents): nothing is half-made or to undo, but
        whether it finished is not known, so it is not reported done; the datastore as it is
        seen now is named, and a new RescanDatastore finishes the job."""
        try:
            status = await self.storage.get_datastore(record.target, with_luns=False)
            h = status.health
            seen = f"its health is {h.state}" + (f" ({h.reason})" if h.reason else "")
        except AgentError as exc:
            seen = f"it cannot be read now ({exc.message})"
        return OperationError(CODES["ABORTED"], f"the agent stopped while rescanning datastore {record.target!r}; a rescan "
                                                f"changes nothing to undo and {seen} (nothing was redone; RescanDatastore "
                                                "again)")
