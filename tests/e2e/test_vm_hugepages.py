"""A guest backed by hugepages, with its memory really on them, in both ways the agent drives QEMU.

The test reserves 2 MiB hugepages on this host (``/proc/sys/vm/nr_hugepages``, restored to what
it found afterwards) after the agent started, boots the x86_64 test guest with ``hugepages: true`` through the real
daemon, and judges from outside the agent:

- QEMU's own mappings (``/proc/<qemu pid>/smaps``): the guest RAM is one hugetlbfs mapping
  with ``KernelPageSize: 2048 kB`` as large as the guest's memory, and the host's hugepage
  pool (``/proc/meminfo``) has that many pages fewer available;
- libvirt's live XML has ``<memoryBacking><hugepages><page size='2048' unit='KiB'/>``;
- a VM asking for more hugepage memory than is free is refused before QEMU runs, with the
  reason, and nothing is defined, also when the pages look free but another process's mapping
  has reserved them (HugePages_Rsvd); after the guest is gone the pages are back.
"""

from __future__ import annotations

import mmap
import os
import re
import time
from pathlib import Path

import grpc
import pytest

from cna_agent.api import pb
from support.guests import guest_spec, serial_log
from support.libvirt import ensure_hugetlbfs
from support.operations import ok, wait

vm = pb.vm_pb2
pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="reserves hugepages and runs QEMU")]
PAGE_KIB = 2048
GUEST_MIB = 192
GUEST_PAGES = GUEST_MIB * 1024 // PAGE_KIB
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


def _meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = int(value.split()[0])
    return out


def _available_pages() -> int:
    """Free hugepages nobody has reserved yet (a hugetlbfs mapping reserves at mmap time)."""
    m = _meminfo()
    return m["HugePages_Free"] - m["HugePages_Rsvd"]


@pytest.fixture
def hugepages():
    """reserve(n): n more default-size (2 MiB) hugepages than the host had; put back after."""
    assert _meminfo()["Hugepagesize"] == PAGE_KIB, "the host's default hugepage size is not 2 MiB"
    ensure_hugetlbfs()
    before = int(NR_HUGEPAGES.read_text())

    def reserve(pages: int) -> None:
        want = before + pages
        NR_HUGEPAGES.write_text(f"{want}\n")
        got = int(NR_HUGEPAGES.read_text())
        if got < want:
            pytest.fail(f"the kernel gave {got - before} of {pages} hugepages (memory too fragmented)")

    try:
        yield reserve
    finally:
        NR_HUGEPAGES.write_text(f"{before}\n")
        assert int(NR_HUGEPAGES.read_text()) == before, "the host's hugepage reservation was not restored"


def _huge_mappings(pid: int) -> list[tuple[str, str, int]]:
    """(start address, path, size in KiB) of every mapping of ``pid`` backed by 2 MiB pages."""
    out: list[tuple[str, str, int]] = []
    start, path, size = "", "", 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$", line)
        if head:
            start, path, size = head.group(1), head.group(2), 0
        elif line.startswith("Size:"):
            size = int(line.split()[1])
        elif line.startswith("KernelPageSize:") and int(line.split()[1]) == PAGE_KIB:
            out.append((start, path, size))
    return out


def _error(ch, op_or_exc) -> tuple[str, str]:
    if isinstance(op_or_exc, grpc.RpcError):
        return op_or_exc.code().name, op_or_exc.details()
    op = wait(ch, op_or_exc, timeout=60, poll=True)
    assert op.HasField("error"), f"the operation succeeded: {op}"
    return next(c.name for c in grpc.StatusCode if c.value[0] == op.error.code), op.error.message


def _domain_xml(agent, mode: str, uuid: str) -> str:
    if mode == "embedded":
        return (agent.dir / "state" / "libvirt" / "run" / "qemu").joinpath(
            next(p.name for p in (agent.dir / "state" / "libvirt" / "run" / "qemu").glob("*.xml")
                 if uuid in p.read_text())).read_text()
    import libvirt

    conn = libvirt.open("qemu:///system")
    try:
        return conn.lookupByUUIDString(uuid).XMLDesc(0)
    finally:
        conn.close()


def test_hugepage_guest_memory_sits_on_hugepages_and_too_few_pages_are_refused(vm_agent_factory, system_mode, hugepages):
    libvirt_mode = system_mode
    agent = vm_agent_factory(mode=libvirt_mode)
    # reserved while the agent runs, as an admin would: the placer counts the kernel's pools when
    # it plans, not the topology it read at start-up
    hugepages(GUEST_PAGES + 16)
    with agent.channel() as ch:
        vms = pb.vm_pb2_grpc.VmServiceStub(ch)

        # more hugepage memory than the pool has: refused by the placer, before QEMU, nothing defined
        try:
            outcome = vms.CreateVm(vm.CreateVmRequest(spec=guest_spec("x86_64", "huge-big", hugepages=True, memory_mib=1024),
                                                      start=True), timeout=60)
        except grpc.RpcError as exc:
            outcome = exc
        code, message = _error(ch, outcome)
        assert code == "FAILED_PRECONDITION" and "not enough free hugepages" in message, (code, message)
        # (on the host's libvirtd other agents' VMs may be listed too: only this name must be absent)
        assert "huge-big" not in [v.name for v in vms.ListVms(vm.ListVmsRequest(status_only=True), timeout=30).vms]

        # pages another process's mapping reserved (HugePages_Rsvd) look free but are not: refused
        # by the placer too, instead of QEMU failing "unable to map backing store for guest RAM"
        squatter = Path(ensure_hugetlbfs()) / f"cna-test-squatter-{os.getpid()}"
        with squatter.open("w+b") as f:
            f.truncate(32 * PAGE_KIB * 1024)
            held = mmap.mmap(f.fileno(), 32 * PAGE_KIB * 1024, flags=mmap.MAP_SHARED)
            try:
                assert _meminfo()["HugePages_Rsvd"] >= 32
                try:
                    outcome = vms.CreateVm(vm.CreateVmRequest(spec=guest_spec("x86_64", "huge-rsvd", hugepages=True,
                                                                              memory_mib=GUEST_MIB), start=True), timeout=60)
                except grpc.RpcError as exc:
                    outcome = exc
                code, message = _error(ch, outcome)
                assert code == "FAILED_PRECONDITION" and "not enough free hugepages" in message, (code, message)
            finally:
                held.close()
                squatter.unlink()
        assert "huge-rsvd" not in [v.name for v in vms.ListVms(vm.ListVmsRequest(status_only=True), timeout=30).vms]

        available = _available_pages()
        created = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=guest_spec("x86_64", "huge-ok", hugepages=True,
                                                                         memory_mib=GUEST_MIB), start=True), timeout=60),
                     120, poll=True, into=vm.Vm())
        serial_log(agent, created.uuid).wait_for(r"CNA-GUEST-READY", timeout=120)
        pid = int(vms.GetVm(vm.GetVmRequest(vm=created.uuid), timeout=30).status.qemu_pid)

        # the guest RAM is one mapping of 2 MiB pages, exactly the guest's size
        huge = _huge_mappings(pid)
        assert [size for _, _, size in huge] == [GUEST_MIB * 1024], huge
        start, path, _ = huge[0]
        assert path.startswith(ensure_hugetlbfs() + "/"), huge  # a file on the hugetlbfs mount
        numa = Path(f"/proc/{pid}/numa_maps").read_text()
        ram = [line for line in numa.splitlines() if line.startswith(f"{start} ")]
        assert ram and " huge " in ram[0] and f"kernelpagesize_kB={PAGE_KIB}" in ram[0], numa
        # ... and the pool has the guest's pages fewer (reserved at mmap, faulted as the guest runs)
        assert available - _available_pages() == GUEST_PAGES, (available, _meminfo())
        xml = _domain_xml(agent, libvirt_mode, created.uuid)
        assert re.search(r"<memoryBacking>\s*<hugepages>\s*<page size=.2048. unit=.KiB./>", xml), xml

        ok(ch, vms.DeleteVm(vm.DeleteVmRequest(vm=created.uuid, force=True), timeout=60), poll=True)
        deadline = time.monotonic() + 30
        while _available_pages() != available:
            assert time.monotonic() < deadline, f"the guest's hugepages did not come back: {_meminfo()}"
            time.sleep(0.2)
