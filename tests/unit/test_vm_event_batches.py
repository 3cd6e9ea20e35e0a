"""The event monitor (compute/events.py) under a burst, on libvirt's test driver through the real
Hypervisor: libvirt's callbacks queue while the consumer is busy, and the consumer takes the
queue as one batch (one state read, one event-log commit and one ledger commit per run of
lifecycle events) while every event still reaches the log in the order libvirt sent it, with
the state libvirt gives for its domain. Judged from the event log's and the ledger's SQLite
rows and from libvirt's own domain states."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import libvirt

from cna_agent.compute.events import DomainEventMonitor
from cna_agent.compute.ledger import KEY_PREFIX, VmStateLedger
from cna_agent.hypervisor import Hypervisor
from cna_agent.state.eventlog import EventHub, EventLog
from cna_agent.state.store import StateStore

DOMAIN = "<domain type='test'><name>{name}</name><memory>1024</memory><os><type>hvm</type></os></domain>"


async def _until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_a_burst_is_handled_as_batches_in_libvirts_order(tmp_path):
    node = tmp_path / "node.xml"
    node.write_text("<node/>")  # a private test-driver instance: no other test's domains
    store = StateStore(tmp_path / "agent.db")

    async def scenario():
        hv = Hypervisor(f"test://{node}")
        await hv.start()
        log = EventLog(store)
        hub = EventHub(store, log)

        async def managed(_uuid: str) -> bool:
            return True

        monitor = DomainEventMonitor(hv, hub, ledger=VmStateLedger(store, hub, managed))
        conn = hv._conn
        doms = [conn.defineXML(DOMAIN.format(name=f"b{i:02d}")) for i in range(50)]
        for d in doms:
            d.create()
        await monitor.start()
        for d in doms[40:]:  # paused beforehand, to be resumed in the burst
            d.suspend()
        await _until(lambda: len(log.list(types=["vm.lifecycle"], limit=1000)) >= 10)
        before = log.last_sequence()

        calls, commits = 0, []
        real_call, real_many = hv.call, log.append_many

        async def counted_call(fn, **kw):
            nonlocal calls
            calls += 1
            return await real_call(fn, **kw)

        def counted_many(events):
            records = real_many(events)
            commits.append(len(records))
            return records

        hv.call = counted_call  # type: ignore[method-assign]
        log.append_many = counted_many  # type: ignore[method-assign]
        # The burst, with the loop held: libvirt's callbacks run on its event thread meanwhile
        # and queue everything, as they do while the consumer is busy with an earlier batch.
        for d in doms[:30]:
            d.suspend()
        time.sleep(0.3)  # libvirt's thread has handed the 30 over before the reboot comes
        monitor._cb_reboot(conn, doms[30], None)  # a reboot event between the two runs
        for d in doms[40:]:
            d.resume()
        time.sleep(0.5)
        await _until(lambda: log.last_sequence() >= before + 41)
        await asyncio.sleep(0.2)  # nothing more is coming
        events = log.list(after=before, limit=1000)
        truth = {d.UUIDString(): d.state()[0] for d in doms}
        ledger = {r["key"][len(KEY_PREFIX):]: json.loads(r["value"])["state"]
                  for r in store.query("SELECT key, value FROM kv WHERE key LIKE ?", (KEY_PREFIX + "%",))}
        reads = calls  # before stop(), whose deregistration is a call too
        await monitor.stop()
        await hv.stop()
        return doms, events, truth, ledger, reads, commits

    doms, events, truth, ledger, calls, commits = asyncio.run(scenario())
    store.close()
    uuid_of = {d.name(): d.UUIDString() for d in doms}
    # libvirt's order: 30 suspended, the reboot, 10 resumed; each with the state libvirt has
    assert [(e.type, e.resource_name, e.attributes.get("event")) for e in events] == (
        [("vm.lifecycle", f"b{i:02d}", "suspended") for i in range(30)] + [("vm.reboot", "b30", None)]
        + [("vm.lifecycle", f"b{i:02d}", "resumed") for i in range(40, 50)])
    for e in events:
        if e.type == "vm.lifecycle":
            want = {libvirt.VIR_DOMAIN_PAUSED: "paused", libvirt.VIR_DOMAIN_RUNNING: "running"}[truth[e.resource_id]]
            assert e.attributes["state"] == want, e
    # the ledger holds each VM's last published state; b30-b39 started before the monitor and had no event
    assert ledger == {**{uuid_of[f"b{i:02d}"]: "paused" for i in range(30)},
                      **{uuid_of[f"b{i:02d}"]: "running" for i in range(40, 50)}}
    # Batched: the 40 lifecycle events took two state reads and two commits (one per run), not 40
    assert commits == [30, 10], commits
    assert calls == 2, calls


def test_events_are_read_and_published_while_every_libvirt_thread_is_busy(tmp_path):
    """The state reads after events run in the monitor's own pool: with the libvirt pool's only
    thread held by a call that does not return (an operation waiting on a slow QEMU), a
    domain's pause still reaches the event log."""
    from cna_agent.blocking import BlockingPool

    node = tmp_path / "node.xml"
    node.write_text("<node/>")
    store = StateStore(tmp_path / "agent.db")

    async def scenario():
        hv = Hypervisor(f"test://{node}", executor_threads=1)
        await hv.start()
        log = EventLog(store)
        monitor = DomainEventMonitor(hv, EventHub(store, log), pool=BlockingPool("libvirt-events", 1, 10.0))
        await monitor.start()
        dom = hv._conn.defineXML(DOMAIN.format(name="held"))
        dom.create()
        await _until(lambda: any(e.attributes.get("event") == "started" for e in log.list(types=["vm.lifecycle"])))
        release = threading.Event()
        held = asyncio.create_task(hv.call(lambda _c: release.wait(20), timeout=30, what="a held call"))
        await asyncio.sleep(0.1)
        assert hv.pool.stats().busy == 1
        dom.suspend()
        try:
            await _until(lambda: any(e.attributes.get("state") == "paused" for e in log.list(types=["vm.lifecycle"])), 5)
        finally:
            release.set()
            await held
        await monitor.stop()
        await hv.stop()

    asyncio.run(scenario())
    store.close()


def test_a_batch_state_read_is_one_libvirt_call_and_survives_a_gone_domain_and_a_dead_connection(tmp_path):
    """The batch's state read asks libvirt once for all its domains (virDomainListGetStats on
    the objects the callbacks got): a domain undefined since its event reads as gone; domain
    objects of another connection (the agent reconnected since the events came) are not
    asked (libvirt would answer from that connection): each such domain is looked up on the
    live one. Judged against libvirt's own dom.state()."""
    node = tmp_path / "node.xml"
    node.write_text("<node/>")
    store = StateStore(tmp_path / "agent.db")

    async def scenario():
        hv = Hypervisor(f"test://{node}")
        await hv.start()
        monitor = DomainEventMonitor(hv, EventHub(store, EventLog(store)))
        conn = hv._conn
        doms = [conn.defineXML(DOMAIN.format(name=f"r{i}")) for i in range(3)]
        for d in doms:
            d.create()
        doms[1].suspend()
        gone = conn.defineXML(DOMAIN.format(name="gone"))
        gone_uuid = gone.UUIDString()
        gone.undefine()
        calls = 0
        real_call = hv.call

        async def counted(fn, **kw):
            nonlocal calls
            calls += 1
            return await real_call(fn, **kw)

        hv.call = counted  # type: ignore[method-assign]
        bulk = await monitor._current_states({**{d.UUIDString(): d for d in doms}, gone_uuid: gone})
        one_call = calls
        # The same domains' objects from a connection closed before the read (a test:///FILE
        # connection has private state: they are defined on it with the same UUIDs)
        other = libvirt.open(f"test://{node}")
        stale = {d.UUIDString(): other.defineXML(d.XMLDesc(0)) for d in doms}
        other.close()
        fallback = await monitor._current_states(stale)
        truth = {d.UUIDString(): d.state()[0] for d in doms}
        await hv.stop()
        return bulk, one_call, fallback, truth, gone_uuid

    bulk, one_call, fallback, truth, gone_uuid = asyncio.run(scenario())
    store.close()
    word = {libvirt.VIR_DOMAIN_PAUSED: "paused", libvirt.VIR_DOMAIN_RUNNING: "running"}
    assert one_call == 1
    assert bulk[gone_uuid] is None
    for got in (bulk, fallback):
        assert {u: got[u][0] for u in truth} == {u: word[s] for u, s in truth.items()}
    assert sorted(word[s] for s in truth.values()) == ["paused", "running", "running"]
