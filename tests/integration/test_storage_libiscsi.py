"""iSCSI LUNs through QEMU's libiscsi against a real tgtd on 127.0.0.1, and hung-storage isolation.

tgtd (from tools/testbed.py) serves two file-backed LUNs. The storage service lists them with
iscsi-ls + qemu-img, binds one for compute as a network disk, and qemu-io reads and writes it
through libiscsi using exactly the binding's host/port/name. Then tgtd is SIGSTOPped: the
datastore probe reports unreachable at its deadline and a LUN call fails with
DEADLINE_EXCEEDED, while a directory datastore keeps answering at once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import pytest

from cna_agent.errors import DeadlineExceeded
from cna_agent.storage.executor import StorageExecutor
from cna_agent.storage.model import DatastoreDecl, validate_datastore
from cna_agent.storage.runner import SubprocessRunner
from cna_agent.storage.service import StorageService

pytestmark = pytest.mark.needs_root
IQN = "iqn.2024-01.test.cna:storage-libiscsi"
MiB = 1024**2


class _Events:
    def __init__(self) -> None:
        self.published: list[tuple[str, dict]] = []

    async def publish(self, type: str, **kw) -> None:
        self.published.append((type, kw))


@pytest.fixture()
def target(testbed, tmp_path):
    luns = [tmp_path / "lun1.img", tmp_path / "lun2.img"]
    for f, size in zip(luns, (64 * MiB, 32 * MiB)):
        with open(f, "wb") as fh:
            fh.truncate(size)
    testbed.iscsi_create_target(IQN, luns)
    yield luns
    testbed.iscsi_delete_target(IQN)


def _service(tmp_path, events, probe_timeout=3.0):
    (tmp_path / "local").mkdir(exist_ok=True)
    san = validate_datastore(DatastoreDecl(name="san1", type="iscsi", portals=("127.0.0.1:3260",), target_iqn=IQN,
                                           initiator="libiscsi", scan_timeout_s=5.0), "san1")
    local = validate_datastore(DatastoreDecl(name="local", type="dir", path=str(tmp_path / "local")), "local")
    return StorageService((san, local), SubprocessRunner(), StorageExecutor(2, 60), ops=None, events=events,  # type: ignore[arg-type]
                          command_timeout=60, probe_interval=3600, probe_timeout=probe_timeout)


def test_libiscsi_luns_listed_bound_and_read_written_by_qemu(target, tmp_path):
    events = _Events()
    svc = _service(tmp_path, events)

    async def go():
        await svc.monitor.probe_all()
        luns = await svc.list_luns("san1")
        binding = await svc.resolve_lun("san1", "2", field="spec.disks[1].lun", vm="0c4f6a2e-0000-4000-8000-0000000000c1")
        ds = await svc.get_datastore("san1")
        svc.executor.shutdown()
        return luns, binding, ds

    luns, binding, ds = asyncio.run(go())
    assert [(lun.id, lun.size_bytes) for lun in luns] == [(f"{IQN}/1", 64 * MiB), (f"{IQN}/2", 32 * MiB)]
    assert (binding.kind, binding.protocol, binding.hosts, binding.name) == ("network", "iscsi", (("127.0.0.1", 3260),), f"{IQN}/2")
    assert ds.health.state == "ok" and ds.capacity_bytes == 96 * MiB and ds.location == f"iscsi://127.0.0.1:3260/{IQN}"
    (host, port), = binding.hosts
    url = f"iscsi://{host}:{port}/{binding.name}"
    w = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5c 1M 64k", url], capture_output=True, text=True, timeout=60)
    assert w.returncode == 0 and "wrote 65536/65536 bytes" in w.stdout, w.stderr
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x5c 1M 64k", url], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    with open(target[1], "rb") as fh:  # the bytes really landed in tgtd's backing file of LUN 2
        fh.seek(MiB)
        assert fh.read(65536) == b"\x5c" * 65536


@pytest.mark.slow
def test_hung_target_is_reported_and_does_not_block_other_datastores(target, testbed, tmp_path):
    pids = testbed.status()["tgtd"]["started_pids"]
    if not pids:
        pytest.skip("tgtd was not started by this testbed; refusing to SIGSTOP a foreign daemon")
    events = _Events()
    svc = _service(tmp_path, events, probe_timeout=2.0)

    async def go():
        await svc.monitor.probe_all()
        assert svc.monitor.get("san1").state == "ok"
        os.kill(pids[0], signal.SIGSTOP)
        try:
            hung = asyncio.create_task(svc.list_luns("san1"))  # a storage call stuck on the SAN
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            local = await svc.get_datastore("local")  # answers while the SAN call hangs
            local_s = time.monotonic() - t0
            health = await svc.monitor.probe("san1")
            with pytest.raises(DeadlineExceeded):
                await hung
        finally:
            os.kill(pids[0], signal.SIGCONT)
        recovered = await svc.monitor.probe("san1")
        svc.executor.shutdown()
        return local, local_s, health, recovered

    local, local_s, health, recovered = asyncio.run(go())
    assert local.health.state == "ok" and local.capacity_bytes > 0 and local_s < 1.0
    assert health.state == "unreachable" and "2s" in health.reason
    assert recovered.state == "ok"
    kinds = [(t, kw["attributes"]["health"]) for t, kw in events.published]
    assert ("datastore.health", "unreachable") in kinds and ("datastore.health", "ok") in kinds
