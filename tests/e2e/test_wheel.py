"""The wheel is the unit of delivery: build it, install it elsewhere, import it cold.

protoc writes absolute imports named after the proto package; if the -I root, the proto
package and the place the modules land disagree, the source tree still works (it is on
sys.path) while the installed wheel breaks. So this test imports every generated module and
the native extension from the installed wheel, in a fresh interpreter whose working directory
is not the source tree.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_installs_and_imports_cold(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("cna_agent-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    protos = sorted(p.stem for p in (REPO / "proto" / "cna" / "v1").glob("*.proto"))
    for stem in protos:
        assert f"cna_agent/_gen/cna/v1/{stem}_pb2.py" in names
        assert f"cna_agent/_gen/cna/v1/{stem}_pb2_grpc.py" in names
    assert any(n.startswith("cna_agent/_native") and n.endswith(".so") for n in names)
    assert not any(n.startswith("cna/") for n in names), "the wheel must not own a top-level 'cna' package"
    assert any(n.endswith("entry_points.txt") for n in names)

    target = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr[-3000:]
    code = f"""
import importlib, sys
mods = {[f'cna_agent._gen.cna.v1.{s}_pb2' for s in protos] + [f'cna_agent._gen.cna.v1.{s}_pb2_grpc' for s in protos]!r}
for m in mods:
    importlib.import_module(m)
import cna_agent, cna_agent._native, cna_agent.daemon, cna_agent.cli.main, cna_agent.api.server
assert cna_agent.__file__.startswith({str(target)!r}), cna_agent.__file__
from cna_agent.host.topology import probe_topology
assert probe_topology('/', use_native=True) == probe_topology('/', use_native=False)
print('ok', len(mods))
"""
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"ok {2 * len(protos)}"
