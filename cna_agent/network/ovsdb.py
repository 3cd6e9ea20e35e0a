"""Open vSwitch through the OVSDB protocol (the ``ovs`` package's IDL), never ovs-vsctl output.

Why the IDL: it keeps an in-memory replica of the Open_vSwitch database that the server
updates, so reading bridges/ports for a reconcile pass costs no round trip, and a whole set of
changes (a bridge, its uplink, a hundred VLAN ports) goes to the server as ONE transaction that
either applies completely or not at all. ovs-vsctl would be one process and one transaction per
command, and its table output is made for humans (DESIGN.md, "Avoid").

The IDL is not thread-safe (and is one connection), so every call runs on the one thread of a
BlockingPool named "ovsdb" (``OvsdbClient.call``); each blocking wait inside has the
``[network] ovsdb_timeout_s`` deadline, the call as a whole that plus a short grace, and an
unreachable server is reported as UNAVAILABLE naming the remote. Writes are verified against concurrent changes (``verify``) and retried on
TRY_AGAIN, the IDL's signal that another client changed what we read.
"""

from __future__ import annotations

import logging
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from cna_agent.blocking import BlockingPool
from cna_agent.errors import DeadlineExceeded, FailedPrecondition, NotFound, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Tables (all their columns) the agent replicates.
TABLES = ("Open_vSwitch", "Bridge", "Port", "Interface", "QoS", "Queue")
#: external_ids keys on a VIF's Interface row (the first four are what libvirt itself writes
#: as attached-mac / iface-id / vm-id; vm-uuid and port-group are ours, for audit and repair).
VIF_KEYS = ("iface-id", "attached-mac", "iface-status", "vm-id", "vm-uuid", "port-group")
MANAGED_KEY = "cna-managed"
#: A call's deadline is its own timeout plus this, so the IDL's own, more specific errors
#: (cannot connect, not committed) reach the caller first.
CALL_GRACE_S = 2.0


@dataclass
class PortState:
    name: str
    tag: int | None = None
    trunks: tuple[int, ...] = ()
    external_ids: dict[str, str] = field(default_factory=dict)
    iface_type: str = ""
    iface_external_ids: dict[str, str] = field(default_factory=dict)
    ofport: int | None = None
    link_state: str = ""
    ingress_policing_rate: int = 0
    ingress_policing_burst: int = 0
    qos_max_rate: int = 0
    error: str = ""


@dataclass
class BridgeState:
    name: str
    datapath_type: str = ""
    fail_mode: str = ""
    external_ids: dict[str, str] = field(default_factory=dict)
    ports: dict[str, PortState] = field(default_factory=dict)
    mtu_request: int = 0


@dataclass(frozen=True)
class PortWant:
    """A port the agent wants on a bridge (a VIF, or a port group's access port)."""

    name: str
    tag: int | None = None
    trunks: tuple[int, ...] = ()
    iface_type: str = ""  # "" = an existing host device (tap), "internal" = made by vswitchd
    external_ids: tuple[tuple[str, str], ...] = ()
    iface_external_ids: tuple[tuple[str, str], ...] = ()
    #: VM -> host traffic policing (kbit/s, kbit); 0 = off.
    ingress_rate_kbps: int = 0
    ingress_burst_kb: int = 0
    #: host -> VM shaping through a linux-htb QoS row (bit/s); 0 = none.
    egress_max_rate_bps: int = 0


def _get(row: Any, column: str, default: Any) -> Any:
    """A column of a row; rows inserted in this transaction have no value until one is set."""
    try:
        return getattr(row, column)
    except AttributeError:
        return default


def _one(value: Any) -> Any:
    """An optional column as a scalar (the IDL gives [] or [x])."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


class OvsdbClient:
    """One IDL connection to an ovsdb-server, used from one thread."""

    def __init__(self, remote: str, timeout: float = 10.0) -> None:
        self.remote = remote
        self.timeout = timeout
        #: One thread: the IDL is one connection and not thread-safe.
        self.pool = BlockingPool("ovsdb", 1, timeout + CALL_GRACE_S, hint="is ovsdb-server answering?")
        self._idl: Any = None

    # -- threading ------------------------------------------------------------------------

    async def call(self, fn: Callable[["OvsdbClient"], T], timeout: float | None = None) -> T:
        """Run ``fn(self)`` on the OVSDB thread; an answer later than the deadline is an error."""
        limit = (timeout or self.timeout) + CALL_GRACE_S
        return await self.pool.run(lambda: fn(self), timeout=limit, what=f"OVSDB request to {self.remote}")

    def close(self) -> None:
        def _close(_: Any = None) -> None:
            if self._idl is not None:
                self._idl.close()
                self._idl = None
        try:
            self.pool.run_sync(_close, timeout=5, what=f"closing OVSDB connection to {self.remote}")
        except Exception:  # closing is best effort
            pass
        self.pool.shutdown()

    # -- connection (OVSDB thread only) ---------------------------------------------------

    def _schema_helper(self, deadline: float) -> Any:
        import ovs.jsonrpc
        import ovs.poller
        import ovs.stream
        from ovs.db import idl as ovs_idl

        err, strm = ovs.stream.Stream.open_block(ovs.stream.Stream.open(self.remote), int(self.timeout * 1000))
        if err:
            raise Unavailable(f"cannot connect to OVSDB at {self.remote}: {__import__('os').strerror(err)} "
                              "(is ovsdb-server running? set [network] ovsdb)")
        rpc = ovs.jsonrpc.Connection(strm)
        try:
            err = rpc.send(ovs.jsonrpc.Message.create_request("get_schema", ["Open_vSwitch"]))
            while True:
                if err:
                    raise Unavailable(f"OVSDB at {self.remote}: get_schema failed: {__import__('os').strerror(err)}")
                err, msg = rpc.recv()
                if msg is not None:
                    break
                if err and err != __import__("errno").EAGAIN:
                    continue
                err = 0
                if time.monotonic() > deadline:
                    raise DeadlineExceeded(f"OVSDB at {self.remote} did not send its schema within {self.timeout:g}s")
                poller = ovs.poller.Poller()
                rpc.run()
                rpc.wait(poller)
                rpc.recv_wait(poller)
                poller.timer_wait(100)
                poller.block()
            if msg.error:
                raise Unavailable(f"OVSDB at {self.remote}: get_schema: {msg.error}")
            helper = ovs_idl.SchemaHelper(None, msg.result)
        finally:
            rpc.close()
        for table in TABLES:
            helper.register_table(table)
        return helper

    def _wait(self, done: Callable[[], bool], deadline: float, what: str) -> None:
        import ovs.poller

        while True:
            self._idl.run()
            if done():
                return
            if time.monotonic() > deadline:
                raise Unavailable(f"OVSDB at {self.remote}: {what} did not happen within {self.timeout:g}s")
            poller = ovs.poller.Poller()
            self._idl.wait(poller)
            poller.timer_wait(100)
            poller.block()

    @staticmethod
    def _connected(idl: Any) -> bool:
        # The IDL has no public "connected now" query; its jsonrpc session has.
        return bool(idl._session.is_connected())

    def idl(self) -> Any:
        """The connected IDL, (re)connecting when needed; its replica is current on return."""
        from ovs.db import idl as ovs_idl

        deadline = time.monotonic() + self.timeout
        if self._idl is not None and not self._connected(self._idl):
            # Let the session reconnect; a dead server turns into UNAVAILABLE below.
            try:
                self._wait(lambda: self._connected(self._idl), deadline, "reconnecting")
            except Unavailable:
                self._idl.close()
                self._idl = None
                raise
        if self._idl is None:
            helper = self._schema_helper(deadline)
            idl = ovs_idl.Idl(self.remote, helper)
            self._idl = idl
            try:
                self._wait(lambda: idl.has_ever_connected() and self._connected(idl), deadline, "the initial database snapshot")
            except Exception:
                idl.close()
                self._idl = None
                raise
        else:
            self._idl.run()
        return self._idl

    def transact(self, build: Callable[[Any, Any], T], what: str, *, wait_vswitchd: bool = False) -> T:
        """Run ``build(txn, idl)`` in one transaction, retried when the database moved under us.

        ``wait_vswitchd``: also wait until ovs-vswitchd has applied the change (it bumps
        cur_cfg to our next_cfg, as ovs-vsctl waits by default), for changes whose effect
        others depend on at once, e.g. a bridge's kernel interface libvirt is about to use.
        """
        from ovs.db import idl as ovs_idl
        import ovs.poller

        for _attempt in range(5):
            idl = self.idl()
            txn = ovs_idl.Transaction(idl)
            result = build(txn, idl)
            root = None
            if wait_vswitchd and txn._txn_rows:  # noqa: SLF001 - only when something changes
                root = self._root(idl, txn)
                root.increment("next_cfg")
            deadline = time.monotonic() + self.timeout
            while True:
                status = txn.commit()
                if status != ovs_idl.Transaction.INCOMPLETE:
                    break
                if time.monotonic() > deadline:
                    txn.abort()
                    raise DeadlineExceeded(f"OVSDB at {self.remote}: {what} was not committed within {self.timeout:g}s")
                idl.run()
                poller = ovs.poller.Poller()
                idl.wait(poller)
                txn.wait(poller)
                poller.timer_wait(100)
                poller.block()
            if status in (ovs_idl.Transaction.SUCCESS, ovs_idl.Transaction.UNCHANGED):
                # Let the replica catch up with our own change before anyone reads it.
                idl.run()
                if root is not None and status == ovs_idl.Transaction.SUCCESS:
                    target = txn.get_increment_new_value()
                    rows = list(idl.tables["Open_vSwitch"].rows.values())
                    self._wait(lambda: bool(rows) and int(rows[0].cur_cfg) >= target, time.monotonic() + self.timeout,
                               f"ovs-vswitchd applying {what} (is ovs-vswitchd running?)")
                return result
            if status == ovs_idl.Transaction.TRY_AGAIN:
                continue
            raise Unavailable(f"OVSDB at {self.remote}: {what} failed: {status} {txn.get_error() or ''}".strip())
        raise Unavailable(f"OVSDB at {self.remote}: {what} kept conflicting with other clients; retry")

    # -- reads ----------------------------------------------------------------------------

    def bridges(self) -> dict[str, BridgeState]:
        """Every bridge with its ports, from the replica."""
        idl = self.idl()
        out: dict[str, BridgeState] = {}
        for br in idl.tables["Bridge"].rows.values():
            state = BridgeState(name=br.name, datapath_type=br.datapath_type, fail_mode=_one(br.fail_mode) or "",
                                external_ids=dict(br.external_ids))
            for port in br.ports:
                ps = PortState(name=port.name, tag=_one(port.tag), trunks=tuple(sorted(port.trunks)), external_ids=dict(port.external_ids))
                qos = _one(port.qos)
                if qos is not None:
                    ps.qos_max_rate = int(qos.other_config.get("max-rate", "0") or 0)
                ifaces = list(port.interfaces)
                if ifaces:
                    iface = ifaces[0]
                    ps.iface_type = iface.type
                    ps.iface_external_ids = dict(iface.external_ids)
                    ps.ofport = _one(iface.ofport)
                    ps.link_state = _one(iface.link_state) or ""
                    ps.ingress_policing_rate = int(iface.ingress_policing_rate)
                    ps.ingress_policing_burst = int(iface.ingress_policing_burst)
                    ps.error = _one(iface.error) or ""
                    if port.name == br.name:
                        state.mtu_request = int(_one(iface.mtu_request) or 0)
                state.ports[port.name] = ps
            out[br.name] = state
        return out

    # -- writes ---------------------------------------------------------------------------

    @staticmethod
    def _find(idl: Any, table: str, name: str) -> Any:
        for row in idl.tables[table].rows.values():
            if row.name == name:
                return row
        return None

    @staticmethod
    def _root(idl: Any, txn: Any) -> Any:
        rows = list(idl.tables["Open_vSwitch"].rows.values())
        if rows:
            return rows[0]
        # A freshly created database: the root row is what `ovs-vsctl init` would add.
        return txn.insert(idl.tables["Open_vSwitch"])

    def ensure_bridge(self, name: str, *, datapath_type: str, fail_mode: str, uplink: str = "", mtu: int = 0,
                      external_ids: dict[str, str] | None = None) -> list[str]:
        """Make bridge ``name`` exist as declared; return what changed (empty = nothing)."""

        def build(txn: Any, idl: Any) -> list[str]:
            changes: list[str] = []
            br = self._find(idl, "Bridge", name)
            if br is None:
                root = self._root(idl, txn)
                iface = txn.insert(idl.tables["Interface"])
                iface.name = name
                iface.type = "internal"
                port = txn.insert(idl.tables["Port"])
                port.name = name
                port.interfaces = [iface]
                br = txn.insert(idl.tables["Bridge"])
                br.name = name
                br.ports = [port]
                root.verify("bridges")
                root.bridges = list(root.bridges) + [br]
                changes.append(f"created OVS bridge {name}")
                ports = {name: port}
                internal = iface
            else:
                ports = {p.name: p for p in br.ports}
                own = ports.get(name)
                internal = list(own.interfaces)[0] if own is not None and own.interfaces else None
            created = bool(changes)
            have_dp = _get(br, "datapath_type", "")
            if have_dp != datapath_type:
                if not created:
                    changes.append(f"datapath_type {have_dp or 'system'} -> {datapath_type}")
                br.datapath_type = datapath_type
            have_fm = _one(_get(br, "fail_mode", [])) or ""
            if have_fm != fail_mode:
                if not created:
                    changes.append(f"fail_mode {have_fm or 'standalone'} -> {fail_mode}")
                br.fail_mode = fail_mode
            have_ids = dict(_get(br, "external_ids", {}))
            want_ids = {**have_ids, MANAGED_KEY: "true", **(external_ids or {})}
            if have_ids != want_ids:
                br.external_ids = want_ids
            if mtu and internal is not None and int(_one(_get(internal, "mtu_request", [])) or 0) != mtu:
                internal.mtu_request = mtu
                changes.append(f"mtu_request {mtu}")
            if uplink and uplink not in ports:
                other = self._find(idl, "Port", uplink)
                if other is not None:
                    raise FailedPrecondition(f"bridge.uplink: {uplink!r} is already a port of another OVS bridge", field="bridge.uplink")
                iface = txn.insert(idl.tables["Interface"])
                iface.name = uplink
                port = txn.insert(idl.tables["Port"])
                port.name = uplink
                port.interfaces = [iface]
                port.external_ids = {"cna-role": "uplink"}
                br.verify("ports")
                br.ports = list(br.ports) + [port]
                changes.append(f"added uplink {uplink}")
            if uplink and uplink in ports and mtu:
                upl_ifaces = list(ports[uplink].interfaces)
                if upl_ifaces and int(_one(_get(upl_ifaces[0], "mtu_request", [])) or 0) != mtu:
                    upl_ifaces[0].mtu_request = mtu
            return changes

        return self.transact(build, f"ensure bridge {name}", wait_vswitchd=True)

    def delete_bridge(self, name: str) -> bool:
        def build(txn: Any, idl: Any) -> bool:
            br = self._find(idl, "Bridge", name)
            if br is None:
                return False
            root = self._root(idl, txn)
            root.verify("bridges")
            root.bridges = [b for b in root.bridges if b.uuid != br.uuid]
            br.delete()
            return True

        return self.transact(build, f"delete bridge {name}", wait_vswitchd=True)

    def ensure_ports(self, bridge: str, wants: list[PortWant], *, wait_vswitchd: bool = True) -> list[str]:
        """Make every wanted port exist on ``bridge`` with its VLAN, ids and rate limits, in ONE
        transaction; ports already right are left untouched. Returns the changes."""

        def build(txn: Any, idl: Any) -> list[str]:
            br = self._find(idl, "Bridge", bridge)
            if br is None:
                raise NotFound(f"OVS bridge {bridge!r} does not exist", field="bridge")
            changes: list[str] = []
            current = {p.name: p for p in br.ports}
            added = []
            for want in wants:
                port = current.get(want.name)
                if port is None:
                    elsewhere = self._find(idl, "Port", want.name)
                    if elsewhere is not None:
                        raise FailedPrecondition(f"port {want.name!r} is on another OVS bridge", field="port")
                    iface = txn.insert(idl.tables["Interface"])
                    iface.name = want.name
                    iface.type = want.iface_type
                    port = txn.insert(idl.tables["Port"])
                    port.name = want.name
                    port.interfaces = [iface]
                    added.append(port)
                    changes.append(f"added port {want.name}")
                else:
                    iface = list(port.interfaces)[0]
                changes += self._apply_port(txn, idl, port, iface, want, new=port in added)
            if added:
                br.verify("ports")
                br.ports = list(br.ports) + added
            return changes

        return self.transact(build, f"ensure {len(wants)} port(s) on {bridge}", wait_vswitchd=wait_vswitchd)

    def _apply_port(self, txn: Any, idl: Any, port: Any, iface: Any, want: PortWant, *, new: bool) -> list[str]:
        changes: list[str] = []
        tag = _one(_get(port, "tag", []))
        if tag != want.tag:
            port.tag = [want.tag] if want.tag is not None else []
            if not new:
                changes.append(f"{want.name}: tag {tag} -> {want.tag}")
        if tuple(sorted(_get(port, "trunks", []))) != tuple(sorted(want.trunks)):
            port.trunks = list(want.trunks)
            if not new:
                changes.append(f"{want.name}: trunks -> {list(want.trunks)}")
        port_ids = dict(_get(port, "external_ids", {}))
        if want.external_ids and any(port_ids.get(k) != v for k, v in want.external_ids):
            port.external_ids = {**port_ids, **dict(want.external_ids)}
            if not new:
                changes.append(f"{want.name}: port external_ids")
        iface_ids = dict(_get(iface, "external_ids", {}))
        if want.iface_external_ids and any(iface_ids.get(k) != v for k, v in want.iface_external_ids):
            iface.external_ids = {**iface_ids, **dict(want.iface_external_ids)}
            if not new:
                changes.append(f"{want.name}: interface external_ids")
        if (int(_get(iface, "ingress_policing_rate", 0)) != want.ingress_rate_kbps
                or int(_get(iface, "ingress_policing_burst", 0)) != want.ingress_burst_kb):
            iface.ingress_policing_rate = want.ingress_rate_kbps
            iface.ingress_policing_burst = want.ingress_burst_kb
            if not new:
                changes.append(f"{want.name}: ingress policing {want.ingress_rate_kbps} kbit/s")
        qos = _one(_get(port, "qos", []))
        have_rate = int(qos.other_config.get("max-rate", "0") or 0) if qos is not None else 0
        if have_rate != want.egress_max_rate_bps:
            if want.egress_max_rate_bps:
                if qos is None:
                    qos = txn.insert(idl.tables["QoS"])
                    qos.type = "linux-htb"
                    port.qos = [qos]
                qos.other_config = {"max-rate": str(want.egress_max_rate_bps)}
            elif qos is not None:
                port.qos = []
                qos.delete()
            if not new:
                changes.append(f"{want.name}: egress shaping {want.egress_max_rate_bps} bit/s")
        return changes

    def delete_ports(self, bridge: str, names: list[str]) -> list[str]:
        def build(txn: Any, idl: Any) -> list[str]:
            br = self._find(idl, "Bridge", bridge)
            if br is None:
                return []
            gone = [p for p in br.ports if p.name in set(names)]
            if gone:
                br.verify("ports")
                br.ports = [p for p in br.ports if p.name not in set(names)]
            return [f"deleted port {p.name}" for p in gone]

        return self.transact(build, f"delete ports on {bridge}")

    def set_port_ids(self, port_name: str, port_ids: dict[str, str], iface_ids: dict[str, str]) -> bool:
        """Merge external_ids into an existing port (e.g. one libvirt plugged)."""

        def build(txn: Any, idl: Any) -> bool:
            port = self._find(idl, "Port", port_name)
            if port is None:
                return False
            if any(port.external_ids.get(k) != v for k, v in port_ids.items()):
                port.external_ids = {**dict(port.external_ids), **port_ids}
            for iface in port.interfaces:
                if any(iface.external_ids.get(k) != v for k, v in iface_ids.items()):
                    iface.external_ids = {**dict(iface.external_ids), **iface_ids}
            return True

        return self.transact(build, f"label port {port_name}")


def new_uuid() -> str:
    return str(uuidlib.uuid4())
