"""The real Debian guest's e2e scaffolding: an agent whose dir datastore holds the built image
as a template (each test linked-clones it), and a shell helper for the guest's console.

Why here: the Secure Boot and hot-plug tests boot the same image the same way; the guest-agent
test adds a bridge and its own config, and keeps its fixture.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from support.agent import AgentProcess, delete_vms_and_stop, start_agent
from support.console import AgentConsole
from support.guests import build_debian_guest

#: The built image, as a volume of the read-only-use datastore ``img`` (the builder's cache
#: directory): CloneVolume's source for linked clones. A linked clone makes it a 0444 template,
#: which the builder's next os.replace does not mind; no test writes it.
TEMPLATE = "img/disk.qcow2"


def image_datastore(guest: dict) -> str:
    """The ``[storage.datastores.img]`` section serving the built image in place: a 3 GiB copy
    per test cost ~13 s of setup each."""
    return f'[storage.datastores.img]\ntype = "dir"\npath = "{Path(guest["disk"]).parent}"\n'


@contextmanager
def debian_agent(caps_cache: Path | None, prefix: str, extra_config: str = "",
                 guest: dict | None = None) -> Iterator[tuple[AgentProcess, dict]]:
    """(agent, the image's manifest); every VM is deleted through the agent afterwards. The
    image's directory is an allowed image dir (direct kernel boot); ``extra_config`` may add
    sections other than ``[compute]``; ``guest`` is another flavour's manifest (the node image)."""
    guest = guest or build_debian_guest("x86_64")
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    ds = base / "ds"
    ds.mkdir(parents=True)
    agent = None
    try:
        agent = start_agent(base / "a", caps_cache, tcp=False,
                            extra_config=f'[compute]\nimage_dirs = "{Path(guest["kernel"]).parent}"\n'
                                         f'[storage.datastores.ds]\ntype = "dir"\npath = "{ds}"\n'
                                         + image_datastore(guest) + extra_config)
        yield agent, guest
    finally:
        delete_vms_and_stop(agent)
        shutil.rmtree(base, ignore_errors=True)


def datastore_dir(agent: AgentProcess) -> Path:
    """The host directory of :func:`debian_agent`'s datastore ``ds`` (beside the agent's dir)."""
    return agent.dir.parent / "ds"


def guest_sh(console: AgentConsole, command: str, timeout: float = 60) -> str:
    """Run ``command`` in the guest's root shell; its output, asserting exit status 0."""
    rc, out = console.run(command, timeout=timeout)
    assert rc == 0, f"{command}: rc={rc} {out}"
    return out.strip()
