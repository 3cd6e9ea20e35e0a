"""A hibernation's files on a datastore (compute/hibernate_store.py) and its mark in libvirt.

The files are real files in a temporary directory: exactly one host's claim wins (O_EXCL), a
host's own claim is its own again, a claimed or incomplete state is not offered for a resume,
newest first. The mark is libvirt metadata in the persistent definition on the test:///default
driver, read back from the domain XML, and the inventory shows such a shut-off VM as HIBERNATED
(and refuses other operations on it, naming the state).
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid as uuidlib

import libvirt
import pytest

from cna_agent.compute import hibernate_store as hs
from cna_agent.compute import state as st
from cna_agent.compute.hibernate import home_datastore
from cna_agent.compute.inventory import VmInventory
from cna_agent.compute.spec import DiskSpec, LunSource, VmSpec
from cna_agent.compute.vmops import save_spec
from cna_agent.errors import FailedPrecondition, NotFound
from cna_agent.operations import ResourceLocks
from support.libvirt import ConnHypervisor

UUID = "5ca2fc69-7ff3-4af0-bcc3-a7a421768feb"


def _state(paths: hs.StatePaths, token: str, saved_at: float = 1.0) -> hs.SavedState:
    s = hs.SavedState(uuid=UUID, name="vm1", spec_json="{}", config_xml="<domain/>", datastore="ds", token=token,
                      saved_at=saved_at, source_host="host-a", paused=False)
    hs.prepare(paths)
    hs.write_record(paths, s)
    with open(paths.memory, "wb") as fh:
        fh.write(b"image")
    return s


def test_tokens_sort_by_time_and_only_well_formed_ones_are_taken() -> None:
    first = hs.new_token()
    later = f"{int(first.split('-')[0]) + 1:013d}-{'0' * 8}"
    assert hs.check_token(first) and hs.check_token(later) and sorted([later, first]) == [first, later]
    for bad in ("", "..", "123-abc", f"{first}/x", "0" * 13 + "-ZZZZZZZZ", "../" + first):
        assert not hs.check_token(bad)


def test_one_claim_wins_among_many_hosts_and_a_hosts_own_claim_is_its_own_again(tmp_path) -> None:
    paths = hs.paths_for(str(tmp_path), UUID, hs.new_token())
    _state(paths, os.path.basename(paths.root))
    results: list[hs.Claim] = []
    barrier = threading.Barrier(8)

    def claim(i: int) -> None:
        barrier.wait()
        results.append(hs.take_claim(paths, f"host-{i}", f"op-{i}"))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = {c.host for c in results}
    assert len(winners) == 1  # every host was told the same holder
    (winner,) = winners
    assert hs.claim_holder(paths).host == winner
    assert hs.take_claim(paths, winner, "op-again").host == winner  # a retry of the winner's resume
    hs.drop_claim(paths, "someone-else")  # only the holder drops it
    assert hs.claim_holder(paths).host == winner
    hs.drop_claim(paths, winner)
    assert hs.claim_holder(paths) is None
    assert oct(os.stat(paths.root).st_mode & 0o777) == "0o700"


def test_only_unclaimed_complete_states_are_resumable_newest_first(tmp_path) -> None:
    area = str(tmp_path)
    old, new, claimed, empty = (f"{1000 + i:013d}-{'a' * 8}" for i in range(4))
    for token in (old, new, claimed):
        _state(hs.paths_for(area, UUID, token), token)
    hs.take_claim(hs.paths_for(area, UUID, claimed), "host-b", "op")
    hs.prepare(hs.paths_for(area, UUID, empty))  # a save that never wrote its image
    os.makedirs(os.path.join(hs.vm_dir(area, UUID), "not-a-token"))
    found = hs.resumable(area, UUID)
    assert [p.root.rsplit("/", 1)[1] for p, _ in found] == [new, old]
    assert found[0][1].token == new and found[0][1].source_host == "host-a"
    assert hs.resumable(area, "00000000-0000-0000-0000-000000000000") == []

    # after a resume elsewhere only the claim stays; discarding the last state removes the VM's dir
    p = hs.paths_for(area, UUID, claimed)
    hs.discard_image(p)
    assert sorted(os.listdir(p.root)) == ["claim"]
    os.rmdir(os.path.join(hs.vm_dir(area, UUID), "not-a-token"))
    for token in (old, new, claimed, empty):
        hs.discard(hs.paths_for(area, UUID, token))
    assert not os.path.exists(hs.vm_dir(area, UUID))


def test_an_unreadable_or_missing_record_is_refused_clearly(tmp_path) -> None:
    paths = hs.paths_for(str(tmp_path), UUID, hs.new_token())
    with pytest.raises(NotFound):
        hs.read_record(paths)
    hs.prepare(paths)
    with open(paths.record, "w") as fh:
        fh.write('{"version": 99}')
    with pytest.raises(FailedPrecondition, match="version"):
        hs.read_record(paths)


def test_the_home_datastore_is_the_first_datastore_volume() -> None:
    spec = VmSpec(name="v", disks=[DiskSpec(volume="/images/boot.raw"), DiskSpec(lun=LunSource(datastore="san", lun_id="1")),
                                   DiskSpec(volume="iso/x.iso", device="cdrom"), DiskSpec(volume="ds1/v/data.qcow2")])
    assert home_datastore(spec) == "ds1"
    assert home_datastore(VmSpec(name="v", disks=[DiskSpec(volume="/images/boot.raw")])) == ""


def test_the_mark_lives_in_the_definition_and_makes_a_shut_off_vm_hibernated() -> None:
    libvirt.registerErrorHandler(lambda c, e: None, None)
    conn = libvirt.open("test:///default")
    name = f"hb-{uuidlib.uuid4().hex[:8]}"
    dom = conn.defineXML(f"<domain type='test'><name>{name}</name><memory>131072</memory><os><type>hvm</type></os></domain>")
    try:
        save_spec(dom, VmSpec(name=name, uuid=dom.UUIDString()), False)
        mark = hs.HibernateMark("shared", hs.new_token(), 1_700_000_000.0)
        hs.write_mark(dom, mark)
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        assert f'datastore="shared" token="{mark.token}"' in xml and hs.HIBERNATE_NS in xml
        assert hs.read_mark(dom) == mark
        inventory = VmInventory(ConnHypervisor(conn), ResourceLocks())  # type: ignore[arg-type]

        async def views():
            return await inventory.get(dom.UUIDString()), await inventory.list(states=[st.HIBERNATED])

        got, listed = asyncio.run(views())
        assert got.state == st.HIBERNATED and got.hibernated == mark
        assert [v.name for v in listed] == [name]
        with pytest.raises(FailedPrecondition, match="hibernated.*shared"):
            asyncio.run(inventory.lookup_uuid(name))
        assert asyncio.run(inventory.lookup_uuid(name, allow_hibernated=True))[1] == name
        hs.write_mark(dom, None)
        hs.write_mark(dom, None)  # removing it twice is done, not an error
        assert hs.read_mark(dom) is None and hs.HIBERNATE_NS not in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    finally:
        dom.undefine()
        conn.close()
