"""The repository's tools/ scripts (testbed, vrm-sim, guest builders), for tests that use them.

Why by path: tools/ is not a package and some scripts have dashes in their names
(build-test-guest.py), so they are loaded from their file, never through ``sys.path``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"


def load_tool(name: str, file: str) -> ModuleType:
    """Import tools/<file> as module ``name`` (registered in sys.modules, as dataclasses need)."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / file)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
