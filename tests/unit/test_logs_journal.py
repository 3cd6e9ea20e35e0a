"""Journal entries with fields (cna_agent/logs_journal.py), received on a datagram socket bound
where journald's would be, and decoded with the native protocol's rules (systemd.io's
JOURNAL_NATIVE_PROTOCOL): the priority from the level, CNA_* fields from the event's key=value
pairs, a multi-line exception in the binary form, and stderr when the journal is not there.
Under real systemd the Debian guest shows the same through journalctl."""

from __future__ import annotations

import logging
import os
import socket
import struct
from pathlib import Path

import pytest

from cna_agent.logs import _TextFormatter
from cna_agent.logs_journal import JournalHandler, event_fields, stderr_is_journal


def _decode(data: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            i = nl + 1
        else:
            (size,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            fields[line.decode()] = data[nl + 9:nl + 9 + size].decode()
            assert data[nl + 9 + size:nl + 10 + size] == b"\n"
            i = nl + 10 + size
    return fields


@pytest.fixture
def journal(tmp_path: Path):
    path = str(tmp_path / "socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    handler = JournalHandler(path=path)
    handler.setFormatter(_TextFormatter())
    log = logging.getLogger("cna_agent.test_journal")
    log.propagate = False
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG)
    yield log, sock, handler
    handler.close()
    sock.close()


def test_an_event_line_becomes_an_entry_with_its_priority_and_fields(journal) -> None:
    log, sock, _ = journal
    log.warning("event=vm.io_error vm=0b5c2f8e-3d41-4a9b-8c7e-6f5a4b3c2d99 disk=vda error='No space left on device'")
    got = _decode(sock.recv(65536))
    assert got["PRIORITY"] == "4" and got["SYSLOG_IDENTIFIER"] == "cna-agent"
    assert got["MESSAGE"].startswith("level=warning logger=cna_agent.test_journal event=vm.io_error")
    assert (got["CNA_EVENT"], got["CNA_VM"], got["CNA_DISK"]) == ("vm.io_error", "0b5c2f8e-3d41-4a9b-8c7e-6f5a4b3c2d99", "vda")
    assert got["CNA_ERROR"] == "No space left on device" and got["CNA_LOGGER"] == "cna_agent.test_journal"
    assert got["CODE_FILE"].endswith("test_logs_journal.py") and int(got["CODE_LINE"]) > 0


def test_a_multi_line_exception_travels_in_the_binary_form(journal) -> None:
    log, sock, _ = journal
    try:
        raise RuntimeError("first line\nsecond line")
    except RuntimeError:
        log.exception("event=rpc.bug method=GetVm")
    got = _decode(sock.recv(65536))
    assert got["PRIORITY"] == "3" and "second line" in got["CNA_EXCEPTION"] and "Traceback" in got["CNA_EXCEPTION"]
    assert got["CNA_METHOD"] == "GetVm"


def test_without_the_journal_an_entry_goes_to_stderr_and_stderr_is_the_journal_only_when_systemd_says_so(
        journal, tmp_path: Path, capsys) -> None:
    log, sock, handler = journal
    handler.path = str(tmp_path / "gone")
    log.error("event=journal.gone")
    assert "event=journal.gone" in capsys.readouterr().err
    st = os.fstat(2)
    assert stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    assert not stderr_is_journal({}) and not stderr_is_journal({"JOURNAL_STREAM": "x:y"})
    assert dict(event_fields("plain text without pairs")) == {}
