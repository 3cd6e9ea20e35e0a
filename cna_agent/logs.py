"""Structured logging to stderr, one event per line, so journald keeps it as it is.

Text format is ``level=info logger=x event=... key=value`` (the key=value style most
call sites already use); json format wraps the same into one object per line.
"""

from __future__ import annotations

import json
import logging
import sys
import time


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        line = f"level={record.levelname.lower()} logger={record.name} {msg}"
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str = "info", fmt: str = "text", target: str = "auto") -> None:
    """Lines on stderr, or (``target`` journal, or auto under systemd) journal entries with
    their own fields (logs_journal.py)."""
    from cna_agent.logs_journal import JournalHandler, stderr_is_journal

    use_journal = target == "journal" or (target == "auto" and stderr_is_journal())
    handler: logging.Handler = JournalHandler() if use_journal else logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("asyncio", "pyroute2"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
