"""iSCSI CHAP end to end: a guest on a LUN of a CHAP-only tgtd target, through QEMU's libiscsi.

The real daemon over gRPC, in both ways it drives QEMU (``libvirt_mode``); tgtd on 127.0.0.1
refuses any initiator that does not present its CHAP account. Judged from outside the agent:

- with a wrong secret the create fails before anything is defined, naming the datastore and the
  config field to fix, no libvirt secret is left behind, and that datastore's health says why;
- the agent's own login (iscsi-ls, qemu-img: the secret in their environment) lists the LUN;
- on the host's libvirtd (``system``) the guest reads what the host put on the LUN and what it
  writes lands in tgtd's backing file (the "array"); libvirt holds the password as a private
  secret the domain XML names by UUID;
- on the embedded driver, which cannot hand QEMU a secret (cna_agent/storage/secrets.py), the
  create is refused up front saying so, and the agent warns at start-up;
- the password is in none of: the agent's log, its events, any process's argv
  (``/proc/*/cmdline``, QEMU's included: libvirt hands QEMU the password AES-encrypted), the
  domain XML, QEMU's log.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import grpc
import pytest

from cna_agent.api import pb
from support.console import AgentConsole
from support.guests import guest_spec, serial_log
from support.operations import ok, wait
from support.san import tgtd_target

vm, ev = pb.vm_pb2, pb.events_pb2
pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="runs tgtd and QEMU")]
IQN = "iqn.2024-01.test.cna:chap"
USER = "cna-chap"
MiB = 1024**2


def _secret_file(path: Path, value: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")  # what `echo secret > file` leaves: the agent strips the newline
    return path


@pytest.fixture
def chap_san(libvirt_mode):
    """A 32 MiB LUN whose first 64 KiB the host filled, served only to CHAP user USER."""
    base = Path(tempfile.mkdtemp(prefix="ch", dir="/tmp"))
    lun = base / "lun1.raw"
    head = os.urandom(64 * 1024)
    with lun.open("wb") as f:
        f.write(head)
        f.truncate(32 * MiB)
    password = "cna" + secrets.token_hex(8)  # 19 characters: tgtd and Windows initiators want 12-16+
    try:
        with tgtd_target(base / "tb", IQN, [lun], chap=(USER, password)) as tb:
            yield tb, base, lun, password, hashlib.sha256(head).hexdigest()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _config(tb, good: Path, bad: Path) -> str:
    out = ""
    for name, secret in (("chapsan", good), ("chapbad", bad)):
        out += (f'[storage.datastores.{name}]\ntype = "iscsi"\nportals = ["{tb.iscsi_portal}"]\n'
                f'target_iqn = "{IQN}"\ninitiator = "libiscsi"\nchap_user = "{USER}"\n'
                f'chap_secret_file = "{secret}"\nscan_timeout_s = 10.0\n')
    return out


# -- what libvirt holds, read from outside the agent ----------------------------------------------

def _libvirt_root(agent) -> Path:
    return agent.dir / "state" / "libvirt"


def _domain_xmls(agent, mode: str) -> list[str]:
    """This agent's domains: live and persistent XML."""
    if mode == "embedded":
        root = _libvirt_root(agent)
        return [p.read_text() for d in (root / "etc" / "qemu", root / "run" / "qemu") if d.is_dir() for p in d.glob("*.xml")]
    import libvirt

    conn = libvirt.open("qemu:///system")
    try:
        out = []
        for dom in conn.listAllDomains():
            xml = dom.XMLDesc(0)
            if str(agent.dir) in xml:
                out.append(xml)
                if dom.isPersistent() and dom.isActive():
                    out.append(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        return out
    finally:
        conn.close()


def _secret_usages(agent, mode: str) -> dict[str, str]:
    """iSCSI secret usage -> its XML, as libvirt stores them."""
    import xml.etree.ElementTree as ET

    if mode == "embedded":
        d = _libvirt_root(agent) / "etc" / "secrets"
        docs = [p.read_text() for p in d.glob("*.xml")] if d.is_dir() else []
    else:
        import libvirt

        conn = libvirt.open("qemu:///system")
        try:
            docs = [s.XMLDesc(0) for s in conn.listAllSecrets()]
        finally:
            conn.close()
    out = {}
    for doc in docs:
        target = ET.fromstring(doc).findtext("usage/target") or ""
        if target.startswith("cna-datastore-chap"):
            out[target] = doc
    return out


def _drop_system_secrets(agent, mode: str) -> None:
    """The host libvirtd keeps secrets after the agent is gone: remove the ones this test made."""
    if mode != "system":
        return
    import libvirt

    conn = libvirt.open("qemu:///system")
    try:
        for usage in ("cna-datastore-chapsan", "cna-datastore-chapbad"):
            try:
                conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_ISCSI, usage).undefine()
            except libvirt.libvirtError:
                pass
    finally:
        conn.close()


def _all_cmdlines() -> list[bytes]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                out.append((p / "cmdline").read_bytes())
            except OSError:
                pass
    return out


def _qemu_logs(agent, mode: str) -> list[Path]:
    d = _libvirt_root(agent) / "log" / "qemu" if mode == "embedded" else Path("/var/log/libvirt/qemu")
    return list(d.glob("*.log")) if d.is_dir() else []


def _create(ch, spec) -> vm.Vm | object:
    """CreateVm(start=True); the Vm, or the failed operation / RpcError."""
    vms = pb.vm_pb2_grpc.VmServiceStub(ch)
    try:
        op = wait(ch, vms.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60), timeout=120, poll=True)
    except grpc.RpcError as exc:
        return exc
    if op.HasField("error"):
        return op
    created = vm.Vm()
    op.response.Unpack(created)
    return created


def _error(outcome) -> tuple[str, str]:
    """(gRPC status name, message) of a create that must have failed."""
    assert not isinstance(outcome, vm.Vm), f"VM {outcome.uuid} was created"
    if isinstance(outcome, grpc.RpcError):
        return outcome.code().name, outcome.details()
    return next(c.name for c in grpc.StatusCode if c.value[0] == outcome.error.code), outcome.error.message


def test_chap_lun_guest_io_reaches_the_array_and_a_wrong_secret_is_refused(vm_agent_factory, libvirt_mode, chap_san):
    tb, base, lun, password, head_sha = chap_san
    good = _secret_file(base / "good.chap", password)
    bad = _secret_file(base / "bad.chap", "wrong" + secrets.token_hex(8))
    agent = vm_agent_factory(mode=libvirt_mode, extra_config=_config(tb, good, bad))
    try:
        with agent.channel() as ch:
            vms = pb.vm_pb2_grpc.VmServiceStub(ch)

            # 1. wrong secret: refused before anything is defined, naming datastore and field
            spec = guest_spec("x86_64", "chap-bad", disks=[vm.DiskSpec(lun=vm.LunSource(datastore="chapbad", lun_id="1"))])
            code, message = _error(_create(ch, spec))
            assert code == "FAILED_PRECONDITION", (code, message)
            assert "chapbad" in message and "storage.datastores.chapbad.chap_secret_file" in message, message
            assert "Authentication failure" in message, message
            assert _domain_xmls(agent, libvirt_mode) == []
            # (on the host's libvirtd other agents' VMs may be listed too: only this name must be absent)
            assert "chap-bad" not in [v.name for v in vms.ListVms(vm.ListVmsRequest(status_only=True), timeout=30).vms]
            assert _secret_usages(agent, libvirt_mode) == {}

            # 2. the agent's own login (iscsi-ls / qemu-img, the secret in their environment) lists the LUN
            storage = pb.storage_pb2_grpc.StorageServiceStub(ch)
            ds = storage.GetDatastore(pb.storage_pb2.GetDatastoreRequest(name="chapsan"), timeout=60)
            assert [(x.id, x.size_bytes) for x in ds.luns] == [(f"{IQN}/1", 32 * MiB)], ds
            # ... and its probe logs in too, so the wrong secret is the other datastore's health reason
            bad_ds = storage.GetDatastore(pb.storage_pb2.GetDatastoreRequest(name="chapbad"), timeout=60)
            assert bad_ds.health == pb.common_pb2.HEALTH_UNREACHABLE and not bad_ds.luns, bad_ds
            assert "Authentication failure" in bad_ds.health_reason, bad_ds
            assert "storage.datastores.chapbad.chap_secret_file" in bad_ds.health_reason, bad_ds

            # 3. right secret: the guest boots with the LUN as vda, reads the host's bytes, writes its own
            spec = guest_spec("x86_64", "chap-ok", disks=[vm.DiskSpec(lun=vm.LunSource(datastore="chapsan", lun_id=f"{IQN}/1"))])
            created = _create(ch, spec)
            if libvirt_mode == "embedded":
                # libvirt's embedded driver cannot hand QEMU a secret (storage/secrets.py): refused up front
                code, message = _error(created)
                assert code == "FAILED_PRECONDITION", (code, message)
                assert "chapsan" in message and "embedded" in message and "qemu:///system" in message, message
                assert "event=datastore.chap_unusable datastore=chapsan" in agent.log_text()  # said at start-up too
                assert _domain_xmls(agent, libvirt_mode) == [] and _secret_usages(agent, libvirt_mode) == {}
                xmls: list[str] = []
            else:
                assert isinstance(created, vm.Vm), created
                assert "chap_unusable" not in agent.log_text()
                serial_log(agent, created.uuid).wait_for(r"CNA-GUEST-READY", timeout=120)
                with AgentConsole(ch, created.uuid) as con:
                    con.send("\n")
                    con.wait_for(r"cna# ", timeout=60, partial=True)
                    rc, out = con.run("dd if=/dev/vda bs=64k count=1 iflag=direct 2>/dev/null | sha256sum", timeout=60)
                    assert rc == 0 and out.split()[0] == head_sha, out
                    rc, out = con.run("dd if=/dev/urandom of=/tmp/pat bs=64k count=16 2>/dev/null && sha256sum /tmp/pat", timeout=60)
                    assert rc == 0, out
                    sha = out.split()[0]
                    rc, out = con.run("dd if=/tmp/pat of=/dev/vda bs=64k seek=16 oflag=direct conv=fsync 2>&1", timeout=120)
                    assert rc == 0 and "16+0 records out" in out, out
                with lun.open("rb") as f:  # on the array
                    f.seek(1 * MiB)
                    assert hashlib.sha256(f.read(1 * MiB)).hexdigest() == sha

                # what libvirt was given: a network disk naming a private secret, never the password
                xmls = _domain_xmls(agent, libvirt_mode)
                assert xmls and all(f"username='{USER}'" in x or f'username="{USER}"' in x for x in xmls), xmls
                usages = _secret_usages(agent, libvirt_mode)
                assert list(usages) == ["cna-datastore-chapsan"], usages
                assert "private='yes'" in usages["cna-datastore-chapsan"] or 'private="yes"' in usages["cna-datastore-chapsan"]
            events = pb.events_pb2_grpc.EventServiceStub(ch).ListEvents(ev.ListEventsRequest(limit=1000), timeout=30)
            assert events.events, "the agent reported no events at all"

            # the password is nowhere a user, an admin or a log collector can read it
            b64 = base64.b64encode(password.encode()).decode()
            places = {"agent log": agent.log_text(), "events": str(events), "domain XML": "\n".join(xmls)}
            places.update({f"qemu log {p}": p.read_text(errors="replace") for p in _qemu_logs(agent, libvirt_mode)})
            places["argv"] = "\n".join(c.replace(b"\0", b" ").decode(errors="replace") for c in _all_cmdlines())
            if libvirt_mode == "system":
                assert "qemu-system-x86_64" in places["argv"]  # QEMU's own argv was among those read
            for where, text in places.items():
                assert password not in text and b64 not in text, f"the CHAP password is in the {where}"

            if isinstance(created, vm.Vm):
                ok(ch, vms.DeleteVm(vm.DeleteVmRequest(vm=created.uuid, force=True), timeout=60), poll=True)
            assert _domain_xmls(agent, libvirt_mode) == []
    finally:
        _drop_system_secrets(agent, libvirt_mode)
