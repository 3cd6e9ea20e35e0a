"""The VRM link against the reference VRM (tools/vrm_sim.py) served in-process over real gRPC.

No agent daemon here: a real StateStore/EventHub in tmp_path, the real VrmLink and the real
vrm-sim servicer on a loopback port. The e2e test (tests/e2e/test_vrm_link.py) does the same
with real processes and kill -9.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path

import grpc
import pytest

from cna_agent.api import pb
from cna_agent.config import VrmConfig
from cna_agent.state.eventlog import EventHub, EventLog
from cna_agent.state.store import StateStore
from cna_agent.vrm.link import ACK_KEY, CONNECTED, LOG_ID_KEY, DISCONNECTED, VrmLink, backoff_delay
from support.tools import load_tool

vrm_sim = load_tool("vrm_sim", "vrm_sim.py")

HOST = "11111111-2222-3333-4444-555555555555"


class Sim:
    """vrm-sim's servicer on a loopback port; stop() and start() again keep its store."""

    def __init__(self, db: Path, **kw) -> None:
        self.db = db
        self.kw = kw
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.store = vrm_sim.Store(str(self.db))
        self.sim = vrm_sim.VrmSim(self.store, **self.kw)
        self.server = grpc.aio.server()
        pb.vrm_pb2_grpc.add_VrmServiceServicer_to_server(self.sim, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop(None)
        self.store.db.close()

    def _query(self, sql: str) -> list[tuple]:
        db = sqlite3.connect(self.db)  # readable after stop(), as the CLI reads it
        try:
            return db.execute(sql, (HOST,)).fetchall()
        finally:
            db.close()

    def sequences(self) -> list[int]:
        return [r[0] for r in self._query("SELECT sequence FROM events WHERE host_uuid = ? ORDER BY sequence")]

    def duplicates(self) -> int:
        rows = self._query("SELECT duplicates FROM hosts WHERE host_uuid = ?")
        return rows[0][0] if rows else 0


def make_link(store: StateStore, hub: EventHub, port: int, **cfg) -> VrmLink:
    config = VrmConfig(address=f"127.0.0.1:{port}", heartbeat_interval_s=cfg.pop("heartbeat_interval_s", 0.3),
                       backoff_min_s=0.05, backoff_max_s=0.2, **cfg)

    async def register_request():
        return pb.vrm_pb2.RegisterRequest(host_uuid=HOST, hostname="h1", agent_version="test", endpoint="127.0.0.1:1")

    async def heartbeat():
        return pb.vrm_pb2.Heartbeat(vms=[pb.vrm_pb2.VmStats(uuid="u1", name="vm1")])

    return VrmLink(config, store=store, events=hub, register_request=register_request, heartbeat=heartbeat,
                   rng=random.Random(1))


async def wait_for(pred, timeout: float = 15.0, what: str = "condition"):
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        value = pred()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout}s")


def open_state(tmp_path: Path, retention: int = 100_000) -> tuple[StateStore, EventHub]:
    store = StateStore(tmp_path / "agent.db")
    return store, EventHub(store, EventLog(store, retention=retention))


async def publish(hub: EventHub, n: int, tag: str) -> list[int]:
    return [(await hub.publish("test.event", message=f"{tag}-{i}")).sequence for i in range(n)]


def test_events_arrive_in_order_acked_and_persisted_heartbeats_carry_stats(tmp_path):
    async def scenario():
        store, hub = open_state(tmp_path)
        sim = Sim(tmp_path / "vrm.db")
        await sim.start()
        sent = await publish(hub, 25, "a")
        link = make_link(store, hub, sim.port)
        await link.start()
        await wait_for(lambda: link.status().acked_sequence == sent[-1], what="ack of the last event")
        sent += await publish(hub, 5, "live")
        await wait_for(lambda: link.status().acked_sequence == sent[-1], what="ack of live events")
        await wait_for(lambda: link.status().heartbeats_sent >= 2, what="two heartbeats")
        st = link.status()
        beat = sim.store.db.execute("SELECT heartbeat FROM hosts").fetchone()[0]
        await link.stop()
        await sim.stop()
        return st, sent, sim.sequences(), store.get_value(ACK_KEY), beat

    st, sent, got, persisted, beat = asyncio.run(scenario())
    assert got == sent
    assert st.state == CONNECTED and st.backlog == 0 and st.connects == 1 and st.failures == 0
    assert persisted == str(sent[-1])
    assert '"uuid": "u1"' in beat and '"last_sequence"' in beat


def test_vrm_restart_on_its_store_gets_every_missed_event_once(tmp_path):
    async def scenario():
        store, hub = open_state(tmp_path)
        sim = Sim(tmp_path / "vrm.db")
        await sim.start()
        sent = await publish(hub, 10, "before")
        link = make_link(store, hub, sim.port)
        await link.start()
        await wait_for(lambda: link.status().acked_sequence == sent[-1])
        await sim.stop()
        await wait_for(lambda: link.status().state == DISCONNECTED, what="disconnect noticed")
        sent += await publish(hub, 15, "while-down")
        assert link.status().backlog == 15
        await sim.start()  # same port, same store
        await wait_for(lambda: link.status().acked_sequence == sent[-1], what="catch-up")
        st = link.status()
        await link.stop()
        await sim.stop()
        return st, sent, sim.sequences(), sim.duplicates()

    st, sent, got, dups = asyncio.run(scenario())
    assert got == sent
    assert dups == 0  # the VRM said where it stood: nothing was sent twice
    assert st.connects >= 2 and st.failures >= 1 and st.last_error


def test_fresh_vrm_gets_the_whole_log_and_agent_restart_resumes_from_the_persisted_ack(tmp_path):
    async def scenario():
        store, hub = open_state(tmp_path)
        # A VRM that keeps no resume point: the agent's own persisted ack decides.
        sim = Sim(tmp_path / "vrm.db", report_resume_point=False)
        await sim.start()
        first = await publish(hub, 8, "one")
        link = make_link(store, hub, sim.port)
        await link.start()
        await wait_for(lambda: link.status().acked_sequence == first[-1])
        await link.stop()  # the agent goes away (its link with it)
        store.close()
        store, hub = open_state(tmp_path)  # "restart": a new process on the same database
        second = await publish(hub, 6, "two")
        link = make_link(store, hub, sim.port)
        await link.start()
        await wait_for(lambda: link.status().acked_sequence == second[-1])
        await link.stop()
        got = sim.sequences()
        dups = sim.duplicates()
        await sim.stop()
        # A brand-new VRM (empty store) that does report a resume point: 0, so the whole log.
        fresh = Sim(tmp_path / "vrm2.db")
        await fresh.start()
        link = make_link(store, hub, fresh.port)
        await link.start()
        await wait_for(lambda: fresh.sequences() == first + second, what="full resend to a fresh VRM")
        await link.stop()
        await fresh.stop()
        return first, second, got, dups

    first, second, got, dups = asyncio.run(scenario())
    assert got == first + second and dups == 0


def test_pruned_events_are_announced_not_skipped_silently(tmp_path):
    async def scenario():
        store, hub = open_state(tmp_path, retention=100)
        sim = Sim(tmp_path / "vrm.db")
        await sim.start()
        # The VRM acked sequence 5 long ago; since then 1200 events came and the log kept 100+.
        await publish(hub, 5, "old")
        store.set_value(ACK_KEY, "5")
        store.set_value(LOG_ID_KEY, "log-1")
        sim.store.db.execute("INSERT INTO hosts(host_uuid, hostname, event_log_id) VALUES (?, 'h1', 'log-1')", (HOST,))
        sim.store.db.execute("INSERT INTO events(host_uuid, sequence, type, event_log_id) VALUES (?, 5, 'x', 'log-1')", (HOST,))
        await publish(hub, 1200, "new")
        oldest = hub.log.oldest_sequence()
        last = hub.log.last_sequence()
        link = make_link(store, hub, sim.port)
        await link.start()
        await wait_for(lambda: link.status().acked_sequence == last, timeout=30)
        await link.stop()
        await sim.stop()
        pruned = sim._query("SELECT pruned_through FROM hosts WHERE host_uuid = ?")[0][0]
        got = sim.sequences()
        return oldest, last, pruned, got

    oldest, last, pruned, got = asyncio.run(scenario())
    assert oldest > 6
    assert pruned == oldest - 1
    assert got == [5] + list(range(oldest, last + 1))


class SilentVrm(pb.vrm_pb2_grpc.VrmServiceServicer):
    """Accepts registration and the stream, then never answers (a hung VRM)."""

    async def Register(self, request, context):
        return pb.vrm_pb2.RegisterResponse(session_id="s", last_acked_sequence=0)

    async def Connect(self, request_iterator, context):
        async for _ in request_iterator:
            pass
        if False:
            yield


def test_silent_vrm_is_dropped_and_retried_and_the_link_never_raises(tmp_path):
    async def scenario():
        store, hub = open_state(tmp_path)
        server = grpc.aio.server()
        pb.vrm_pb2_grpc.add_VrmServiceServicer_to_server(SilentVrm(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await publish(hub, 3, "x")
        link = make_link(store, hub, port, heartbeat_interval_s=0.2)
        await link.start()
        await wait_for(lambda: link.status().failures >= 1, timeout=10, what="silence detected")
        st = link.status()
        await link.stop()
        await server.stop(None)
        return st

    st = asyncio.run(scenario())
    assert "no answer from the VRM" in st.last_error
    assert st.acked_sequence == 0 and st.backlog == 3


def test_unreachable_vrm_backs_off_and_reports(tmp_path):
    async def scenario():
        store, hub = open_state(tmp_path)
        with __import__("socket").socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        link = make_link(store, hub, port)
        await link.start()
        await wait_for(lambda: link.status().failures >= 3, what="three failed attempts")
        st = link.status()
        await link.stop()
        return st

    st = asyncio.run(scenario())
    assert st.state in (DISCONNECTED, "connecting")
    assert st.connects == 0 and "UNAVAILABLE" in st.last_error


def test_backoff_is_full_jitter_below_an_exponential_cap():
    rng = random.Random(7)
    for attempt in range(12):
        cap = min(60.0, 1.0 * 2 ** attempt)
        draws = [backoff_delay(attempt, 1.0, 60.0, rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in draws)
        assert max(draws) > cap * 0.8 and min(draws) < cap * 0.2  # spread over the whole range
    assert backoff_delay(1000, 1.0, 60.0, rng) <= 60.0


def test_disabled_link_does_nothing(tmp_path):
    async def scenario():
        store, hub = open_state(tmp_path)
        link = VrmLink(VrmConfig(), store=store, events=hub, register_request=None, heartbeat=None)
        await link.start()
        st = link.status()
        await link.stop()
        return link.enabled, st

    enabled, st = asyncio.run(scenario())
    assert not enabled and st.state == "disabled"


@pytest.mark.parametrize("changes, key", [
    ({"address": "vrm.example:7800"}, "vrm.address"),
    ({"address": "nope"}, "vrm.address"),
    ({"cert": "/a.pem"}, "vrm.cert"),
    ({"ca": "rel/ca.pem"}, "vrm.ca"),
    ({"host_uuid": "not-a-uuid"}, "vrm.host_uuid"),
    ({"backoff_min_s": 10.0, "backoff_max_s": 1.0}, "vrm.backoff_max_s"),
    ({"heartbeat_interval_s": 0.0}, "vrm.heartbeat_interval_s"),
    ({"batch_size": 0}, "vrm.batch_size"),
])
def test_vrm_config_errors_name_the_key(tmp_path, changes, key):
    from cna_agent.config import ConfigError, load_config

    body = "[vrm]\n" + "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in changes.items())
    cfg = tmp_path / "agent.toml"
    cfg.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_config(cfg, environ={})
    assert key in str(err.value)


def test_vrm_config_accepts_tls_and_remote_with_ca(tmp_path):
    from cna_agent.config import load_config

    cfg = tmp_path / "agent.toml"
    cfg.write_text('[vrm]\naddress = "vrm.example:7800"\nca = "/etc/ca.pem"\ncert = "/etc/c.pem"\nkey = "/etc/k.pem"\n')
    c = load_config(cfg, environ={})
    assert c.vrm.address == "vrm.example:7800" and c.vrm.ca == "/etc/ca.pem"


def test_wiped_agent_state_is_a_new_event_log_not_duplicates_of_the_old_one(tmp_path):
    async def scenario():
        sim = Sim(tmp_path / "vrm.db")
        await sim.start()
        store, hub = open_state(tmp_path / "old")
        await publish(hub, 5, "old")
        link = make_link(store, hub, sim.port)
        await link.start()
        await wait_for(lambda: link.status().acked_sequence == 5)
        await link.stop()
        store.close()
        store, hub = open_state(tmp_path / "reinstalled")  # same host, empty state directory
        await publish(hub, 3, "new")
        link = make_link(store, hub, sim.port)
        await link.start()
        await wait_for(lambda: link.status().acked_sequence == 3, what="the new log acked")
        await link.stop()
        await sim.stop()
        return sim._query("SELECT event_log_id, sequence FROM events WHERE host_uuid = ? ORDER BY rowid"), sim.duplicates()

    rows, dups = asyncio.run(scenario())
    logs = list(dict.fromkeys(r[0] for r in rows))
    assert len(logs) == 2 and all(logs)
    assert [s for lid, s in rows if lid == logs[0]] == [1, 2, 3, 4, 5]
    assert [s for lid, s in rows if lid == logs[1]] == [1, 2, 3]
    assert dups == 0


class ConfusedVrm(pb.vrm_pb2_grpc.VrmServiceServicer):
    """Claims to hold events far beyond anything this agent's log ever wrote."""

    def __init__(self) -> None:
        self.got: list[int] = []

    async def Register(self, request, context):
        return pb.vrm_pb2.RegisterResponse(session_id="s", last_acked_sequence=request.last_sequence + 1000)

    async def Connect(self, request_iterator, context):
        async for msg in request_iterator:
            self.got.extend(e.sequence for e in msg.events.events)
            yield pb.vrm_pb2.VrmMessage(ack=pb.vrm_pb2.Ack(sequence=max(self.got, default=0)))


def test_ack_beyond_the_log_is_not_trusted(tmp_path):
    async def scenario():
        store, hub = open_state(tmp_path)
        vrm = ConfusedVrm()
        server = grpc.aio.server()
        pb.vrm_pb2_grpc.add_VrmServiceServicer_to_server(vrm, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await publish(hub, 4, "x")
        link = make_link(store, hub, port)
        await link.start()
        await wait_for(lambda: link.status().acked_sequence == 4)
        await link.stop()
        await server.stop(None)
        return vrm.got

    assert asyncio.run(scenario()) == [1, 2, 3, 4]
