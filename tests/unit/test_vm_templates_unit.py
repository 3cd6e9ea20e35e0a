"""Templates without QEMU: the clone names a deploy gives, what DeployVm refuses before anything
is made, and the template mark as VmInventory reads it from a definition on libvirt's
test:///default driver (a template is refused a start-like lookup, reported as status.template).
The deploy itself, with real clones and guests, is tests/e2e/test_vm_templates.py."""

from __future__ import annotations

import asyncio
import uuid as uuidlib
from types import SimpleNamespace

import libvirt
import pytest

from cna_agent.compute.customization import GuestCustomization
from cna_agent.compute.inventory import VmInventory
from cna_agent.compute.spec import DiskSpec, NicSpec, VmSpec
from cna_agent.compute.spec_validation import ValidationContext
from cna_agent.compute.template_mark import TemplateMark, read_mark, write_mark
from cna_agent.compute.templates import MAX_DEPLOY, VmTemplates, clone_volume_id
from cna_agent.compute.vmops import save_spec
from cna_agent.errors import FailedPrecondition, InvalidArgument
from cna_agent.operations import ResourceLocks
from support.libvirt import ConnHypervisor


def test_clones_are_named_after_the_vm_and_a_linked_clone_of_a_raw_volume_is_qcow2() -> None:
    assert clone_volume_id("ds/gold/root.qcow2", "web1", "", linked=True) == "ds/web1/root.qcow2"
    assert clone_volume_id("ds/gold/root.raw", "web1", "fast", linked=True) == "fast/web1/root.qcow2"
    assert clone_volume_id("ds/gold/root.raw", "web1", "", linked=False) == "ds/web1/root.raw"


def _templates() -> VmTemplates:
    lifecycle = SimpleNamespace(validation_context=lambda: ValidationContext(), first_boot=None)
    return VmTemplates(SimpleNamespace(), lifecycle, None)  # type: ignore[arg-type]


def test_each_new_spec_gets_its_name_uuid_fresh_macs_and_clones_and_bad_requests_name_the_field() -> None:
    t = _templates()
    gold = VmSpec(name="gold", uuid="0b5c2f8e-3d41-4a9b-8c7e-6f5a4b3c2d99", vcpus=2, memory_mib=512, autostart=True,
                  disks=[DiskSpec(volume="ds/gold/root.qcow2"), DiskSpec(volume="iso/boot.iso", device="cdrom")],
                  nics=[NicSpec(port_group="pg", mac="52:54:00:00:00:01")])
    a, b = t._specs(gold, ["web1", "web2"], True, "", (), "rq")
    assert (a.name, b.name) == ("web1", "web2") and a.uuid != b.uuid and gold.uuid not in (a.uuid, b.uuid)
    assert t._specs(gold, ["web1"], True, "", (), "rq")[0].uuid == a.uuid  # a retry names the same VM
    assert [d.volume for d in a.disks] == ["ds/web1/root.qcow2", "iso/boot.iso"]  # a CD-ROM is shared, not cloned
    assert a.nics[0].mac == "" and a.autostart and (a.vcpus, a.memory_mib) == (2, 512)  # autostart: the template's
    assert gold.disks[0].volume == "ds/gold/root.qcow2"  # the template's spec is not touched
    for names, custom, field in (([], (), "names"), (["a", "a"], (), "names"), (["x"] * (MAX_DEPLOY + 1), (), "names"),
                                 (["ok", "$(id)"], (), "names[1]"), (["a", "b"], (GuestCustomization(),), "customizations")):
        with pytest.raises(InvalidArgument) as err:
            t._specs(gold, names, True, "", custom, "")
        assert err.value.field == field, (names, err.value)
    with pytest.raises(FailedPrecondition, match="customize") as err:
        t._specs(gold, ["a"], True, "", (GuestCustomization(hostname="a"),), "")
    assert err.value.field == "customizations"
    with pytest.raises(InvalidArgument) as err:
        t._specs(gold, ["a"], True, "../x", (), "")
    assert err.value.field == "datastore"


def test_a_template_is_refused_where_a_vm_would_change_and_reported_as_one() -> None:
    libvirt.registerErrorHandler(lambda c, e: None, None)
    conn = libvirt.open("test:///default")
    name = f"tpl-{uuidlib.uuid4().hex[:8]}"
    dom = conn.defineXML(f"<domain type='test'><name>{name}</name><memory>131072</memory><os><type>hvm</type></os></domain>")
    try:
        save_spec(dom, VmSpec(name=name, uuid=dom.UUIDString()), False)
        write_mark(dom, TemplateMark(123.0))
        assert read_mark(dom) == TemplateMark(123.0)
        inventory = VmInventory(ConnHypervisor(conn), ResourceLocks())  # type: ignore[arg-type]

        async def go() -> None:
            with pytest.raises(FailedPrecondition, match="is a template") as err:
                await inventory.lookup_uuid(name)
            assert err.value.field == "vm"
            assert (await inventory.lookup_uuid(name, allow_template=True))[1] == name
            assert (await inventory.get(name)).template
            assert [v.template for v in await inventory.list() if v.name == name] == [True]

        asyncio.run(go())
    finally:
        dom.undefine()
        conn.close()


def test_errors_raised_again_keep_their_class_and_name_the_deploy_request_field() -> None:
    from cna_agent.compute.templates import renamed
    from cna_agent.errors import NotFound, ResourceExhausted, error_for

    err = renamed(InvalidArgument("vm", "must not contain NUL"), "vm", "template")
    assert isinstance(err, InvalidArgument) and err.field == "template" and err.message == "template: must not contain NUL"
    err = renamed(FailedPrecondition("needs the guest agent", field="spec.guest_agent"), "spec.guest_agent",
                  "customizations[1]: spec.guest_agent")
    assert isinstance(err, FailedPrecondition) and err.field == "customizations[1]: spec.guest_agent"
    assert isinstance(error_for("RESOURCE_EXHAUSTED", "full"), ResourceExhausted)
    assert isinstance(error_for("NOT_FOUND", "gone"), NotFound) and error_for("NOT_FOUND", "gone").code_number == 5
    assert error_for("NO_SUCH_CODE", "x").code == "INTERNAL"
    assert type(error_for("FAILED_PRECONDITION", "x")) is FailedPrecondition
    # A journalled error carries the number (an awaited child operation's, as appliances reads it).
    assert type(error_for(9, "x")) is FailedPrecondition and error_for(9, "x").message == "x"
    assert error_for(99, "x").code == "INTERNAL"
    assert type(error_for(10, "stopped")).__name__ == "Aborted"
    lost = error_for(15, "the image is truncated")  # no class of its own: the code is kept all the same
    assert (type(lost).__name__, lost.code, lost.code_number) == ("AgentError", "DATA_LOSS", 15)
