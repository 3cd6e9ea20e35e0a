"""Log records as journald entries with their own fields (systemd's native journal protocol).

Why: under systemd, stderr lines reach the journal as a bare MESSAGE at one priority; an admin
who runs ``journalctl -u cna-agent -p warning`` or ``journalctl CNA_VM=<uuid>`` needs the level
as PRIORITY and the event's key=value pairs as fields, which is what libvirt's and systemd's own
daemons give them. The protocol is one datagram per entry to /run/systemd/journal/socket:
``KEY=value`` lines, or for a value holding a newline ``KEY``, a little-endian 64-bit length and
the bytes (systemd.io/JOURNAL_NATIVE_PROTOCOL). No libsystemd binding is needed.

Used only when systemd connected stderr to the journal (``$JOURNAL_STREAM`` names stderr's
device and inode), so ``cna-agent serve`` in a terminal or under another supervisor still logs
lines on stderr. A datagram the journal refuses (too large, socket gone) is written to stderr
instead: an entry is never lost silently.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import sys
from typing import Iterable

JOURNAL_SOCKET = "/run/systemd/journal/socket"
#: logging levels -> syslog priorities (journald's PRIORITY).
PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}
#: ``key=value`` pairs of the agent's event lines; a value is a bare token or a quoted string.
_PAIR = re.compile(r'(?<!\S)([a-z][a-z0-9_]*)=("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|\S+)')
#: Field names journald accepts: upper case, digits and underscores, not starting with "_".
_FIELD = re.compile(r"[^A-Z0-9_]")
#: A datagram above this goes to stderr instead (journald's limit is larger; this keeps one
#: runaway exception text from being truncated by the socket buffer).
MAX_ENTRY = 64 * 1024


def stderr_is_journal(env: dict[str, str] | None = None) -> bool:
    """Whether systemd connected this process's stderr to the journal ($JOURNAL_STREAM)."""
    value = (env if env is not None else os.environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(2)  # the descriptor systemd connected, whatever sys.stderr is now
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def _field(name: str) -> str:
    key = _FIELD.sub("_", name.upper()).lstrip("_")
    return key[:64] or "X"


def event_fields(message: str) -> Iterable[tuple[str, str]]:
    """``CNA_<KEY>`` fields from the message's key=value pairs (``event=vm.created vm=<uuid>``
    gives CNA_EVENT and CNA_VM), quotes removed."""
    for key, value in _PAIR.findall(message):
        if value[:1] in "\"'" and value[-1:] == value[:1] and len(value) >= 2:
            value = value[1:-1]
        yield f"CNA_{_field(key)}", value


def encode(fields: Iterable[tuple[str, str]]) -> bytes:
    out = bytearray()
    for key, value in fields:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """One journal entry per record: MESSAGE (as the text format prints it), PRIORITY, the
    logger, the source location, SYSLOG_IDENTIFIER, the exception text, and CNA_* fields."""

    def __init__(self, identifier: str = "cna-agent", path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.identifier = identifier
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            fields: list[tuple[str, str]] = [
                ("MESSAGE", message), ("PRIORITY", str(PRIORITIES.get(record.levelno, 6))),
                ("SYSLOG_IDENTIFIER", self.identifier), ("CNA_LOGGER", record.name),
                ("CODE_FILE", record.pathname), ("CODE_LINE", str(record.lineno)), ("CODE_FUNC", record.funcName),
            ]
            if record.exc_info:
                fields.append(("CNA_EXCEPTION", logging.Formatter().formatException(record.exc_info)))
            fields.extend(event_fields(record.getMessage()))
            data = encode(fields)
            if len(data) > MAX_ENTRY:
                raise OSError("entry too large for one datagram")
            self.sock.sendto(data, self.path)
        except OSError:
            try:
                sys.stderr.write(self.format(record) + "\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()
