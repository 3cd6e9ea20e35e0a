"""The embedded state: journal idempotency, recovery, event sequences, on a real SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from cna_agent.errors import CODES, InvalidArgument, ResourceBusy
from cna_agent.operations import OperationRunner
from cna_agent.state.eventlog import EventHub, EventLog, ResumePointTooOld
from cna_agent.state.journal import OperationError, OperationJournal, RequestIdConflict
from cna_agent.state.store import StateStore


@pytest.fixture
def store(tmp_path):
    s = StateStore(tmp_path / "agent.db")
    yield s
    s.close()


def test_schema_created_private_and_versioned(tmp_path, store):
    assert store.schema_version >= 1
    assert (tmp_path / "agent.db").stat().st_mode & 0o777 == 0o600
    assert store.query("PRAGMA journal_mode")[0][0] == "wal"


def test_refuses_a_newer_schema(tmp_path):
    path = tmp_path / "future.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=999")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        StateStore(path)


def test_request_id_returns_the_first_operation(store):
    j = OperationJournal(store)
    first, created = j.begin("vm.start", "vm-1", request_id="r-1", fingerprint="abc")
    again, created_again = j.begin("vm.start", "vm-1", request_id="r-1", fingerprint="abc")
    assert created and not created_again
    assert again.id == first.id
    with pytest.raises(RequestIdConflict, match="r-1"):
        j.begin("vm.stop", "vm-1", request_id="r-1", fingerprint="abc")
    with pytest.raises(RequestIdConflict):
        j.begin("vm.start", "vm-1", request_id="r-1", fingerprint="different body")
    no_id_a, _ = j.begin("vm.start", "vm-1")
    no_id_b, _ = j.begin("vm.start", "vm-1")
    assert no_id_a.id != no_id_b.id


def test_journal_survives_reopen_and_lists_unfinished(tmp_path):
    s = StateStore(tmp_path / "a.db")
    j = OperationJournal(s)
    done, _ = j.begin("vm.create", "a")
    j.finish(done.id, response_type="cna.v1.Vm", response=b"\x0a\x01x")
    open_op, _ = j.begin("vm.start", "b", request_id="r")
    j.update(open_op.id, state="running", percent=40, stage="booting")
    s.close()
    s2 = StateStore(tmp_path / "a.db")
    j2 = OperationJournal(s2)
    unfinished = j2.unfinished()
    assert [o.id for o in unfinished] == [open_op.id]
    assert unfinished[0].percent == 40 and unfinished[0].stage == "booting"
    finished = j2.get(done.id)
    assert finished.done and finished.state == "succeeded" and finished.response == b"\x0a\x01x"
    s2.close()


def test_finish_is_final(store):
    j = OperationJournal(store)
    op, _ = j.begin("x")
    failed = j.finish(op.id, error=OperationError(3, "bad", (("spec.name", "bad"),)))
    assert failed.state == "failed" and failed.error.fields == (("spec.name", "bad"),)
    assert j.finish(op.id).state == "failed"  # a late success does not overwrite the failure
    assert j.update(op.id, percent=50).percent == failed.percent


def test_event_sequences_increase_and_are_never_reused(tmp_path):
    s = StateStore(tmp_path / "e.db")
    log = EventLog(s, retention=100)
    seqs = [log.append("vm.lifecycle", resource_id=f"vm{i % 3}").sequence for i in range(250)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 250
    assert log.prune() > 0
    assert log.oldest_sequence() == seqs[-1] - 99
    with pytest.raises(ResumePointTooOld):
        log.list(after=5)
    s.close()
    s2 = StateStore(tmp_path / "e.db")
    assert EventLog(s2).append("agent.started").sequence == seqs[-1] + 1
    s2.close()


def test_a_batch_of_events_is_one_commit_all_or_none_and_still_pruned(tmp_path):
    s = StateStore(tmp_path / "b.db")
    log = EventLog(s, retention=500)
    first = log.append("agent.started").sequence
    batch = log.append_many([("vm.lifecycle", {"resource_id": f"vm{i}", "attributes": {"i": i}, "when": 5.0 + i})
                             for i in range(10)])
    assert [r.sequence for r in batch] == list(range(first + 1, first + 11))
    assert [(e.resource_id, e.attributes["i"], e.time) for e in log.list(after=first)] == [
        (f"vm{i}", str(i), 5.0 + i) for i in range(10)]
    with pytest.raises(ValueError):  # one bad event refuses the lot
        log.append_many([("vm.lifecycle", {}), ("vm.lifecycle", {"severity": "fatal"})])
    assert log.last_sequence() == first + 10
    with pytest.raises(TypeError):  # a wrong field, after the first insert: rolled back
        log.append_many([("vm.lifecycle", {}), ("vm.lifecycle", {"colour": "red"})])
    assert log.last_sequence() == first + 10
    log.append_many([("vm.lifecycle", {})] * 1200)  # passes 1,000: pruned as append would
    assert log.oldest_sequence() > first and log.pruned_through > 0
    s.close()


def test_event_filters(store):
    log = EventLog(store)
    log.append("vm.lifecycle", resource_id="a")
    log.append("vm.io_error", resource_id="b", severity="error")
    log.append("vmx.other", resource_id="a")
    log.append("operation.done", resource_id="a")
    assert [e.type for e in log.list(types=["vm."])] == ["vm.lifecycle", "vm.io_error"]
    assert [e.type for e in log.list(types=["vm"])] == ["vm.lifecycle", "vm.io_error"]
    assert [e.type for e in log.list(resource_id="a")] == ["vm.lifecycle", "vmx.other", "operation.done"]
    with pytest.raises(ValueError):
        log.append("x", severity="fatal")


def test_follow_resumes_and_sees_live_events_without_loss(store):
    async def scenario():
        hub = EventHub(store, EventLog(store))
        for i in range(3):
            await hub.publish("t.stored", attributes={"i": i})
        seen: list[int] = []

        async def watcher():
            async for e in hub.follow(after=1):
                seen.append(e.sequence)
                if len(seen) == 2 + 50:
                    return

        task = asyncio.create_task(watcher())
        await asyncio.sleep(0.05)
        await asyncio.gather(*(hub.publish("t.live") for _ in range(50)))
        await asyncio.wait_for(task, 5)
        return seen

    seen = asyncio.run(scenario())
    assert seen == list(range(2, 54))



def test_caught_up_watchers_read_memory_and_lose_nothing_across_gaps(store):
    """Ten filtered watchers follow 300 publishes from memory (no store read per event), then
    150 concurrent ones, and an event another writer put straight into the log (a gap in the hub's memory)
    still reaches them, from the store, in sequence order."""
    async def scenario():
        log = EventLog(store)
        hub = EventHub(store, log)
        reads = 0
        plain_list = log.list

        def counted(*a, **kw):
            nonlocal reads
            reads += 1
            return plain_list(*a, **kw)

        log.list = counted  # type: ignore[method-assign]
        start = await hub.last_sequence()
        seen: list[list[int]] = [[] for _ in range(10)]
        wanted = 150 + 1 + 150  # the vm.* publishes and the one written behind the hub's back

        async def watcher(i: int) -> None:
            async for e in hub.follow(after=start, types=["vm."]):
                assert e.type.startswith("vm.")
                seen[i].append(e.sequence)
                if len(seen[i]) == wanted:
                    return

        tasks = [asyncio.create_task(watcher(i)) for i in range(10)]
        await asyncio.sleep(0.05)
        for i in range(300):  # one at a time, the watchers woken after each
            await hub.publish("vm.lifecycle" if i % 2 else "host.other")
            await asyncio.sleep(0)
        behind = await store.run(lambda: log.append("vm.behind"))
        await asyncio.gather(*(hub.publish("vm.lifecycle") for _ in range(150)))
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return seen, reads, behind.sequence

    seen, reads, behind = asyncio.run(scenario())
    expected = [x for x in seen[0]]
    assert behind in expected
    assert expected == sorted(expected) and len(set(expected)) == 301
    assert all(s == expected for s in seen)
    assert reads < 100, f"{reads} store reads for 10 watchers and 451 events"



def test_memory_filter_answers_what_the_store_filter_answers(store):
    """A caught-up watcher filters in memory, a resuming one in SQL: for the same filters both
    must give the same events (prefixes with and without the dot, a type that only shares a
    prefix, a resource id)."""
    async def scenario():
        hub = EventHub(store, EventLog(store))
        start = await hub.last_sequence()
        kinds = ["vm.lifecycle", "vm.lifecycle.extra", "vm.io_error", "vmx.other", "host.net", "vm"]
        for i in range(60):
            await hub.publish(kinds[i % len(kinds)], resource_id=f"r{i % 3}")
        out = {}
        for types, rid in [(["vm."], ""), (["vm.lifecycle"], ""), (["vm"], ""), (["host.", "vm.io_error"], "r1"), ([], "r2")]:
            from_store = [e.sequence for e in hub.log.list(start, types=types, resource_id=rid, limit=1000)]
            followed: list[int] = []

            async def follow() -> None:
                async for e in hub.follow(after=start, types=types, resource_id=rid):
                    followed.append(e.sequence)
                    if len(followed) == len(from_store):
                        return

            await asyncio.wait_for(follow(), 5)
            out[(tuple(types), rid)] = (from_store, followed)
        return out

    for key, (from_store, followed) in asyncio.run(scenario()).items():
        assert from_store, key
        assert followed == from_store, key


def test_runner_idempotent_locked_and_recovering(tmp_path):
    async def scenario():
        store = StateStore(tmp_path / "r.db")
        hub = EventHub(store, EventLog(store))
        runner = OperationRunner(store, OperationJournal(store), hub)
        calls = 0
        gate = asyncio.Event()

        async def slow(ctx):
            nonlocal calls
            calls += 1
            await ctx.progress(50, "half way")
            await gate.wait()
            return None

        first = await runner.submit("vm.start", "vm-1", slow, request_id="req-1", lock_key="vm/1")
        dup = await runner.submit("vm.start", "vm-1", slow, request_id="req-1", lock_key="vm/1")
        assert dup.id == first.id
        with pytest.raises(ResourceBusy, match=first.id):
            await runner.submit("vm.stop", "vm-1", slow, lock_key="vm/1")
        other = await runner.submit("vm.start", "vm-2", slow, lock_key="vm/2")  # another VM: in parallel
        await asyncio.sleep(0.05)
        assert (await runner.get(first.id)).stage == "half way"
        updates = []

        async def watch():
            async for rec in runner.watch(first.id):
                updates.append(rec.state)

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.wait_for(watcher, 5)
        assert updates[-1] == "succeeded"
        assert calls == 2  # req-1 ran once, vm-2 once
        done_again = await runner.submit("vm.start", "vm-1", slow, request_id="req-1", lock_key="vm/1")
        assert done_again.id == first.id and done_again.done and calls == 2

        async def bad(ctx):
            raise InvalidArgument("spec.memory_mib", "must be at least 16")

        failed = await runner.submit("vm.create", "x", bad, wait=5)
        assert failed.state == "failed" and failed.error.code == CODES["INVALID_ARGUMENT"]
        assert failed.error.fields == (("spec.memory_mib", "spec.memory_mib: must be at least 16"),)

        # An operation left open by a "crashed" process is closed on recovery, not re-run.
        orphan, _ = OperationJournal(store).begin("vm.migrate", "vm-3")
        await runner.shutdown()
        recovered = await runner.recover()
        assert [r.id for r in recovered] == [orphan.id]
        assert recovered[0].state == "failed" and recovered[0].metadata["recovered"] == "true"
        assert recovered[0].error.code == CODES["ABORTED"]
        kinds = [e.attributes.get("kind") for e in await hub.list(types=["operation."])]
        assert kinds.count("vm.migrate") == 1
        store.close()
        return other

    asyncio.run(scenario())


def test_shutdown_leaves_interrupted_operations_open_for_recovery(tmp_path):
    async def scenario():
        store = StateStore(tmp_path / "s.db")
        hub = EventHub(store, EventLog(store))
        runner = OperationRunner(store, OperationJournal(store), hub)

        async def forever(ctx):
            await asyncio.Event().wait()

        op = await runner.submit("volume.copy", "ds/a", forever)
        await asyncio.sleep(0.05)
        await runner.shutdown(timeout=0.1)
        left_open = OperationJournal(store).unfinished()
        store.close()
        return op, left_open

    op, left_open = asyncio.run(scenario())
    assert [o.id for o in left_open] == [op.id]
    assert left_open[0].state == "running"


def test_every_finished_operation_has_a_response_or_an_error(tmp_path):
    """AIP-151: a finished operation carries exactly one of them; nothing to return is
    google.protobuf.Empty, a cancel is the CANCELLED status, a recovered operation whose effect
    is there gets the result its handler found."""
    seen: list[tuple[str, object]] = []

    def encode(kind: str, result: object) -> tuple[str, bytes]:
        seen.append((kind, result))
        return ("google.protobuf.Empty", b"") if result is None else ("test.Result", repr(result).encode())

    async def scenario():
        store = StateStore(tmp_path / "o.db")
        hub = EventHub(store, EventLog(store))
        runner = OperationRunner(store, OperationJournal(store), hub, encode=encode)

        async def nothing(ctx):
            return None

        async def forever(ctx):
            await asyncio.Event().wait()

        done = await runner.submit("vm.delete", "vm-1", nothing, wait=5)
        running = await runner.submit("vm.shutdown", "vm-2", forever, cancellable=True)
        await asyncio.sleep(0.05)
        cancelled = await runner.cancel(running.id)
        orphan_ok, _ = OperationJournal(store).begin("vm.create", "vm-3")
        orphan_bad, _ = OperationJournal(store).begin("vm.start", "vm-4")

        async def verified(record):
            return {"uuid": record.target}

        async def not_there(record):
            return OperationError(CODES["ABORTED"], "libvirt shows the VM defined and stopped")

        await runner.recover({"vm.create": verified, "vm.start": not_there})
        got = [await runner.get(i) for i in (done.id, cancelled.id, orphan_ok.id, orphan_bad.id)]
        store.close()
        return got

    done, cancelled, recovered_ok, recovered_bad = asyncio.run(scenario())
    assert (done.state, done.response_type, done.error) == ("succeeded", "google.protobuf.Empty", None)
    assert cancelled.state == "cancelled" and cancelled.error.code == CODES["CANCELLED"] and cancelled.response_type is None
    assert recovered_ok.state == "succeeded" and recovered_ok.response == b"{'uuid': 'vm-3'}" and recovered_ok.error is None
    assert recovered_bad.state == "failed" and recovered_bad.response_type is None and "defined and stopped" in recovered_bad.error.message
    assert ("vm.create", {"uuid": "vm-3"}) in seen and ("vm.delete", None) in seen
