"""Build steps pyproject.toml cannot express declaratively.

Two things are generated at build time rather than committed:

* ``cna_agent._native``: the cffi extension (out-of-line API mode) described by
  ``native/build_native.py``; cffi's setuptools hook compiles it.
* ``cna_agent._gen.cna.v1``: protobuf and gRPC modules from ``proto/cna/v1/*.proto``.
  protoc emits absolute imports named after the proto package (``from cna.v1 import x_pb2``);
  the generated tree lives under ``cna_agent._gen`` so the wheel owns no top-level ``cna``
  package, and those imports are rewritten to ``cna_agent._gen.cna.v1``. A test imports every
  generated module from the installed wheel in a fresh interpreter to prove the two agree.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "tools"))

from gen_proto import generate  # noqa: E402  (tools/gen_proto.py, shared with developers)


class GenerateProto(Command):
    """``python setup.py gen_proto``: regenerate cna_agent/_gen from proto/."""

    description = "generate protobuf/gRPC modules from proto/cna/v1"
    user_options: list = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        generate(HERE / "proto", HERE / "cna_agent" / "_gen")


class BuildPyWithProto(build_py):
    """Generate the gRPC modules into the source package before copying packages.

    Writing into the source tree (gitignored) serves both the wheel and editable installs.
    """

    def run(self) -> None:
        generate(HERE / "proto", HERE / "cna_agent" / "_gen")
        super().run()


def _gen_packages() -> list[str]:
    # The generated packages must be listed even before the first generation ran.
    return ["cna_agent._gen", "cna_agent._gen.cna", "cna_agent._gen.cna.v1"]


def _packages() -> list[str]:
    from setuptools import find_packages

    found = find_packages(include=["cna_agent", "cna_agent.*"])
    return sorted(set(found) | set(_gen_packages()))


setup(
    packages=_packages(),
    cffi_modules=["native/build_native.py:ffibuilder"],
    cmdclass={"build_py": BuildPyWithProto, "gen_proto": GenerateProto},
)
