"""Certificates for TLS tests, made by the real openssl command line in a scratch directory.

Why here: the agent's own TLS listener and its TLS link to the VRM are tested with the same
openssl calls; real certificates, no test-only crypto code.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def openssl(*args: str, cwd: Path) -> None:
    """Run ``openssl args...`` in ``cwd``; fail on a non-zero exit."""
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)
