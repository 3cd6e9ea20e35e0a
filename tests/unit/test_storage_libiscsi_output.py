"""What the agent makes of iscsi-ls and qemu-img through QEMU's initiator (storage/libiscsi.py),
on their real output as seen against tgtd: targets that refuse the login, CHAP errors.

Why unit tests: a portal with several targets, some of them another tenant's, is hard to
stage for every case against a real tgtd; the outputs below were copied from iscsi-ls 1.19 and
qemu-img 7.2 on the testbed (tests/e2e/test_storage_chap.py runs the real thing).
"""

from __future__ import annotations

import pytest

from cna_agent.errors import FailedPrecondition
from cna_agent.storage import libiscsi
from cna_agent.storage.model import DatastoreDecl, validate_datastore
from cna_agent.storage.runner import RecordingRunner

OURS = "iqn.2024-01.test.cna:chap"
OTHER = "iqn.2024-01.test.cna:other"
#: iscsi-ls prints this on stdout, right after the refusing target's line (nothing on stderr).
REFUSED = "list_luns: iscsi_connect failed. Failed to log in to target. Status: Authentication failure(513)\n"
SIZE = '{"virtual-size": 33554432, "filename": "json:{\\"password\\": \\"s3cret\\"}", "format": "raw"}'


def _decl(chap: bool = True) -> DatastoreDecl:
    kw = {"chap_user": "cna-chap", "chap_secret_file": "/etc/cna-agent/san.chap"} if chap else {}
    return validate_datastore(DatastoreDecl(name="san", type="iscsi", portals=("127.0.0.1",), target_iqn=OURS,
                                            initiator="libiscsi", **kw), "storage.datastores.san")


def _listing(*targets: tuple[str, str]) -> str:
    return "".join(f"Target:{iqn} Portal:127.0.0.1:3260,1\n{body}" for iqn, body in targets)


def _refused_at(*targets: tuple[str, str]) -> dict:
    """What iscsi-ls -s answers when the last of ``targets`` refuses the login."""
    return {"stdout": _listing(*targets) + REFUSED, "returncode": 10}


LUNS = "Lun:0    Type:STORAGE_ARRAY_CONTROLLER\nLun:1    Type:DIRECT_ACCESS (Size:31M)\n"


def test_luns_of_the_datastore_target_survive_a_later_target_that_refuses_the_login() -> None:
    runner = RecordingRunner().add("iscsi-ls", **_refused_at((OURS, LUNS), (OTHER, "")))
    runner.add("qemu-img", stdout=SIZE)
    luns = libiscsi.list_luns(runner, _decl(), initiator_iqn="", secret="s3cret", timeout=5)
    assert [(x.id, x.lun, x.size_bytes) for x in luns] == [(f"{OURS}/1", 1, 32 << 20)]


def test_the_datastore_target_refusing_its_chap_login_names_the_keys_to_fix() -> None:
    runner = RecordingRunner().add("iscsi-ls", **_refused_at((OTHER, LUNS), (OURS, "")))
    with pytest.raises(FailedPrecondition) as err:
        libiscsi.list_luns(runner, _decl(), initiator_iqn="", secret="wrong", timeout=5)
    msg = err.value.message
    assert "datastore 'san'" in msg and "Authentication failure(513)" in msg
    assert "storage.datastores.san.chap_user" in msg and "storage.datastores.san.chap_secret_file" in msg
    assert "wrong" not in msg


def test_an_earlier_target_that_refuses_this_host_is_named_when_the_listing_never_reached_ours() -> None:
    runner = RecordingRunner().add("iscsi-ls", **_refused_at((OTHER, "")))
    with pytest.raises(FailedPrecondition) as err:
        libiscsi.list_luns(runner, _decl(), initiator_iqn="", secret="s3cret", timeout=5)
    assert f"stopped at target {OTHER}" in err.value.message and OURS in err.value.message


def test_a_target_requiring_chap_from_a_datastore_without_it_says_to_configure_chap() -> None:
    runner = RecordingRunner().add("qemu-img", returncode=1, stderr=(
        f"qemu-img: Could not open 'iscsi://127.0.0.1:3260/{OURS}/1': iSCSI: Failed to connect to LUN : "
        "Failed to log in to target. Status: Authentication failure(513)\n"))
    with pytest.raises(FailedPrecondition) as err:
        libiscsi.lun_size(runner, _decl(chap=False), 1, secret="", timeout=5, field="spec.disks[0].lun")
    assert err.value.field == "spec.disks[0].lun"
    assert "the target requires CHAP: set storage.datastores.san.chap_user" in err.value.message


def test_the_password_reaches_the_tools_only_through_their_environment() -> None:
    seen: list[dict] = []

    class Runner(RecordingRunner):
        def run(self, argv, *, timeout, input=None, check=True, env=None):
            seen.append(dict(env or {}))
            return super().run(argv, timeout=timeout, input=input, check=check, env=env)

    runner = Runner().add("iscsi-ls", stdout=_listing((OURS, LUNS))).add("qemu-img", stdout=SIZE)
    libiscsi.list_luns(runner, _decl(), initiator_iqn="iqn.1993-08.org.debian:01:1", secret="s3cret", timeout=5)
    assert all("s3cret" not in " ".join(c) for c in runner.calls), runner.calls
    assert seen and all(e == {"LIBISCSI_CHAP_USERNAME": "cna-chap", "LIBISCSI_CHAP_PASSWORD": "s3cret"} for e in seen)


def test_the_probe_logs_in_so_a_wrong_secret_is_the_health_reason() -> None:
    runner = RecordingRunner().add("iscsi-ls", **_refused_at((OURS, "")))
    with pytest.raises(FailedPrecondition) as err:
        libiscsi.probe(runner, _decl(), initiator_iqn="", secret="wrong", timeout=5)
    assert "storage.datastores.san.chap_secret_file" in err.value.message


def test_the_probe_falls_back_to_discovery_when_another_target_blocks_the_listing() -> None:
    runner = RecordingRunner().add("iscsi-ls", "-s", **_refused_at((OTHER, "")))
    runner.add("iscsi-ls", stdout=_listing((OTHER, ""), (OURS, "")))
    assert libiscsi.probe(runner, _decl(), initiator_iqn="", secret="s3cret", timeout=5) == (True, "")
    assert [c[:2] for c in runner.calls] == [("iscsi-ls", "-s"), ("iscsi-ls", "iscsi://127.0.0.1:3260")]


#: qemu-img 7.2 opening a LUN (recorded on the testbed): tgtd killed; a LUN the target does not
#: have; a target the portal does not have.
ARRAY_DOWN = ("qemu-img: Could not open 'iscsi://127.0.0.1:3260/iqn.2026-12.test.cna:faults/1': iSCSI: Failed to "
              "connect to LUN : iscsi_service failed with : iscsi_service_reconnect_if_loggedin. Can not reconnect right now.")
NO_LUN = ("qemu-img: Could not open 'iscsi://127.0.0.1:3260/iqn.2026-12.test.cna:probe/5': iSCSI: Failed to connect to LUN : "
          "SENSE KEY:ILLEGAL_REQUEST(5) ASCQ:LOGICAL_UNIT_NOT_SUPPORTED(0x2500)")
NO_TARGET = ("qemu-img: Could not open 'iscsi://127.0.0.1:3260/iqn.2026-12.nope/1': iSCSI: Failed to connect to LUN : "
             "Failed to log in to target. Status: Target not found(515)")


@pytest.mark.parametrize("stderr, error", [(ARRAY_DOWN, "Unavailable"), (NO_LUN, "NotFound"), (NO_TARGET, "NotFound")])
def test_an_array_that_does_not_answer_is_unavailable_and_a_missing_lun_not_found(stderr, error) -> None:
    """A manager retries UNAVAILABLE; NOT_FOUND tells it the request names something wrong, which
    an array that is down (the fault suite's tgtd-down point) does not."""
    runner = RecordingRunner().add("qemu-img", stderr=stderr + "\n", returncode=1)
    with pytest.raises(Exception) as err:
        libiscsi.lun_size(runner, _decl(chap=False), 1, secret="", timeout=10, field="disk")
    assert type(err.value).__name__ == error, err.value
    assert err.value.field == "disk"
    assert ("does not answer" in err.value.message) == (error == "Unavailable")
