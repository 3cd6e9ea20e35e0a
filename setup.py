"""Build steps pyproject.toml cannot express declaratively.

Two things are generated at build time rather than committed:

* ``cna_agent._native``: the cffi extension (out-of-line API mode) described by
  ``native/build_native.py``; cffi's setuptools hook compiles it.
* ``cna_agent._gen.cna.v1``: protobuf and gRPC modules from ``proto/cna/v1/*.proto``
  (tools/gen_proto.py explains the import rewrite). They are generated when this file is
  loaded, before setuptools looks for packages: egg_info (run first by pip, also for
  editable installs) needs the package directories to exist. Generation takes well under a
  second and writes into the source tree (gitignored), which serves the wheel and editable
  installs alike.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "tools"))

from gen_proto import generate  # noqa: E402  (tools/gen_proto.py, shared with developers)

generate(HERE / "proto", HERE / "cna_agent" / "_gen")

setup(
    packages=find_packages(include=["cna_agent", "cna_agent.*"]),
    cffi_modules=["native/build_native.py:ffibuilder"],
)
