"""The agent's .deb under a real systemd: a Debian guest is the hypervisor host.

The package is built by ``tools/build-packages.sh`` (what the README tells an admin to run) and
installed by apt into the node flavour of the Debian image (``build-debian-guest.py
--node-deb``), with the distribution's python3-libvirt, QEMU and the rest of its Depends; dpkg
runs its maintainer scripts, so the unit is enabled as on an installed host and starts at boot.
Everything is judged inside that guest, from systemctl, journalctl, /proc and dpkg, never from
what the agent says about itself:

* the unit reaches READY (Type=notify) with the agent's STATUS= text, and its watchdog is armed
  and fed (the watchdog timestamp moves on while the agent runs);
* a guest of the node's own (nested TCG under the embedded driver) keeps its QEMU process across
  ``systemctl restart cna-agent`` (KillMode=process), and the restarted agent adopts it;
* ``journalctl -o json`` carries the agent's structured fields (CNA_EVENT, CNA_VM, PRIORITY);
* a drop-in with a misspelt key fails the unit at once (no restart loop: a configuration error is
  permanent until an admin edits it) and ``systemctl status`` names the key and the file;
* ``apt-get purge`` stops the agent, removes what the package installed (programs, unit, the
  config it shipped) and leaves the VM running with its definition and its disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from cna_agent import __version__
from cna_agent.api import pb

from support.agent import AgentProcess
from support.console import AgentConsole, SerialLog, login_root
from support.debian import TEMPLATE, debian_agent, guest_sh
from support.guests import build_debian_node
from support.operations import ok
from support.tools import TOOLS
from support.waiting import wait_for

vm, st = pb.vm_pb2, pb.storage_pb2
SYSTEM_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}
pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="mmdebstrap and the embedded QEMU driver need root")]

#: The node guest's own VM: diskless firmware would do for KillMode=, but a disk on a datastore
#: shows that a purge leaves VMs *and their disks*. No console: nothing reads it.
NESTED_SPEC = {"name": "nested", "vcpus": 1, "memory_mib": 64, "arch": "ARCH_X86_64",
               "console": {"type": "CONSOLE_TYPE_NONE"}, "disks": [{"volume": "local/nested.qcow2"}]}
DATASTORE_DROPIN = '[storage.datastores.local]\ntype = "dir"\npath = "/var/lib/cna-images"\n'


@pytest.fixture(scope="module")
def node_deb(tmp_path_factory) -> Path:
    needed = ("dpkg-buildpackage", "dh", "argparse-manpage", "protoc", "grpc_python_plugin", "mmdebstrap")
    missing = [t for t in needed if shutil.which(t, path=SYSTEM_ENV["PATH"]) is None]
    if missing:
        pytest.skip(f"packaging tools missing (tools/setup.sh installs them): {missing}")
    prebuilt = _prebuilt_deb()
    if prebuilt is not None:
        return prebuilt
    out = tmp_path_factory.mktemp("node-deb")
    proc = subprocess.run(["bash", str(TOOLS / "build-packages.sh"), str(out)], capture_output=True, text=True,
                          timeout=1200, env={**SYSTEM_ENV, "CNA_PACKAGES": "deb"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (deb,) = out.glob(f"cna-agent_{__version__}_*.deb")
    return deb


def _prebuilt_deb() -> Path | None:
    """The .deb tools/run-tests.sh built from this tree in the background (node image warmed
    too), once its job says done; None without one or when that build failed."""
    run_dir = os.environ.get("CNA_NODE_DEB_DIR")
    if not run_dir:
        return None
    done = Path(run_dir) / "done"
    wait_for(done.exists, 900, "run-tests.sh's background .deb and node image build", interval=2)
    debs = sorted((Path(run_dir) / "out").glob(f"cna-agent_{__version__}_*.deb"))
    return debs[0] if done.read_text().strip() == "0" and len(debs) == 1 else None


@pytest.fixture
def node_env(libvirt_caps_cache, node_deb) -> Iterator[tuple[AgentProcess, dict]]:
    with debian_agent(libvirt_caps_cache, "sdn", guest=build_debian_node(node_deb)) as env:
        yield env


def _sh(console: AgentConsole, command: str, timeout: float = 60) -> str:
    """guest_sh, with the agent's journal in the failure message (what an admin would read)."""
    rc, out = console.run(command, timeout=timeout)
    if rc != 0:
        journal = c_run(console, "journalctl --no-pager -u cna-agent -n 40 -o cat")
        raise AssertionError(f"{command}: rc={rc} {out}\n--- journalctl -u cna-agent:\n{journal}")
    return out.strip()


def _show(console: AgentConsole, *props: str) -> dict[str, str]:
    out = guest_sh(console, f"systemctl show -p {','.join(props)} cna-agent")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _ctl_json(console: AgentConsole, command: str, timeout: float = 120) -> dict:
    out = guest_sh(console, f"cna-ctl --json {command}", timeout=timeout)
    return json.loads(out[out.index("{"):])


def _qemu_pids(console: AgentConsole) -> list[str]:
    return guest_sh(console, "pgrep -f '^/usr/bin/qemu-system-x86_64 .*guest=nested' || true").split()


def _wait_active(console: AgentConsole, timeout: float) -> dict[str, str]:
    def active():
        props = _show(console, "ActiveState", "SubState", "StatusText", "MainPID", "NRestarts")
        return props if (props["ActiveState"], props["SubState"]) == ("active", "running") else None
    try:
        return wait_for(active, timeout, "cna-agent active (running)", interval=2)
    except AssertionError as exc:
        journal = c_run(console, "systemctl status -l --no-pager cna-agent; journalctl --no-pager -u cna-agent -n 40")
        raise AssertionError(f"{exc}\n{journal}") from None


def c_run(console: AgentConsole, command: str) -> str:
    """A command's output whatever its exit status (for failure messages)."""
    return console.run(command, timeout=60)[1]


def test_the_deb_runs_under_systemd_keeps_its_guest_across_restarts_fails_on_a_bad_dropin_and_purges_cleanly(node_env):
    agent, node = node_env
    with agent.channel() as ch:
        vms = pb.vm_pb2_grpc.VmServiceStub(ch)
        storage = pb.storage_pb2_grpc.StorageServiceStub(ch)
        ok(ch, storage.CloneVolume(st.CloneVolumeRequest(request_id="sdn-clone", source=TEMPLATE, datastore="ds",
                                                         path="sdn/root.qcow2", linked=True), timeout=30))
        spec = vm.VmSpec(
            name="deb-node", vcpus=2, memory_mib=1536, serial_console=True, arch=pb.common_pb2.ARCH_X86_64,
            console=vm.ConsoleSpec(type=vm.CONSOLE_TYPE_NONE),
            boot=vm.BootSpec(kernel=node["kernel"], initrd=node["initrd"], cmdline=node["cmdline_without_seed"]),
            disks=[vm.DiskSpec(volume="ds/sdn/root.qcow2")])
        uuid = ok(ch, vms.CreateVm(vm.CreateVmRequest(spec=spec, start=True), timeout=60), into=vm.Vm()).uuid
        # The marker unit is ordered after multi-user.target, which waits for the notify unit's READY.
        SerialLog(agent.dir / "run" / "vms" / uuid / "serial.log").wait_for(r"CNA-GUEST-READY boot=1", timeout=300)

        with AgentConsole(ch, uuid) as c:
            login_root(c, node["root_password"])
            assert _sh(c, "dpkg-query -W -f='${Status} ${Version}' cna-agent") == f"install ok installed {__version__}"
            assert _sh(c, "systemctl is-enabled cna-agent") == "enabled"

            # -- READY, STATUS= and the watchdog -----------------------------------------------
            first = _wait_active(c, 120)
            assert first["StatusText"], first
            dog = _show(c, "WatchdogUSec", "WatchdogTimestampMonotonic", "NotifyAccess", "KillMode", "Type")
            assert (dog["Type"], dog["NotifyAccess"], dog["KillMode"], dog["WatchdogUSec"]) == ("notify", "main", "process", "30s")
            fed_at = int(dog["WatchdogTimestampMonotonic"])
            assert fed_at > 0

            # -- a datastore for the nested guest (an admin's drop-in), applied by a restart -----
            _sh(c, "mkdir -p /var/lib/cna-images && printf '" + DATASTORE_DROPIN.replace("\n", "\\n")
                     + "' > /etc/cna-agent/agent.toml.d/10-local.toml")
            _sh(c, "systemctl restart cna-agent", timeout=180)
            _wait_active(c, 60)
            _sh(c, "cna-ctl volume create --size 16M local/nested.qcow2", timeout=120)
            _sh(c, f"printf '%s' '{json.dumps(NESTED_SPEC)}' > /root/nested.json")
            _sh(c, "cna-ctl vm define /root/nested.json && cna-ctl vm start nested", timeout=240)
            (qemu_pid,) = wait_for(lambda: _qemu_pids(c) or None, 60, "the nested guest's QEMU")
            nested_uuid = _ctl_json(c, "vm show nested")["uuid"]

            # The watchdog was fed while all that ran (pings at half of WatchdogSec).
            fed_later = int(_show(c, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"])
            if fed_later <= fed_at:
                time.sleep(16)
                fed_later = int(_show(c, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"])
            assert fed_later > fed_at

            # -- restart: the nested QEMU is the same process, and the new agent adopts it -------
            before = _show(c, "MainPID")["MainPID"]
            _sh(c, "systemctl restart cna-agent", timeout=180)
            after = _wait_active(c, 60)
            assert after["MainPID"] != before
            assert _qemu_pids(c) == [qemu_pid]
            listed = _ctl_json(c, "vm show nested")
            assert listed["uuid"] == nested_uuid and listed["status"]["state"] == "VM_STATE_RUNNING", listed

            # -- the journal's structured fields ------------------------------------------------
            entries = [json.loads(line) for line in guest_sh(
                c, "journalctl --no-pager -u cna-agent -o json --output-fields=CNA_EVENT,CNA_VM,PRIORITY,MESSAGE"
                   " CNA_EVENT=agent.ready CNA_EVENT=qmp.attached", timeout=60).splitlines() if line.startswith("{")]
            ready = [e for e in entries if e.get("CNA_EVENT") == "agent.ready"]
            assert len(ready) >= 3 and all(e["PRIORITY"] == "6" for e in ready), entries
            # The side channel attached at the start and again at the adoption, each entry with the VM.
            attached = [e for e in entries if e.get("CNA_EVENT") == "qmp.attached" and e.get("CNA_VM") == nested_uuid]
            assert len(attached) >= 2, entries

            # -- a bad drop-in: the unit fails at once and status names the key and the file ----
            _sh(c, "printf '[grpc]\\nlisen = \"0.0.0.0:1\"\\n' > /etc/cna-agent/agent.toml.d/50-bad.toml")
            rc, _ = c.run("systemctl restart cna-agent", timeout=180)
            assert rc != 0
            failed = _show(c, "ActiveState", "Result", "ExecMainStatus")
            assert failed == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": "2"}, failed
            status = c.run("systemctl status -l --no-pager cna-agent", timeout=60)[1]
            assert "grpc.lisen" in status and "50-bad.toml" in status, status
            time.sleep(6)  # one RestartSec= later it is still failed: no restart loop on a config error
            assert _show(c, "ActiveState", "NRestarts") == {"ActiveState": "failed", "NRestarts": "0"}
            assert _qemu_pids(c) == [qemu_pid]
            _sh(c, "rm /etc/cna-agent/agent.toml.d/50-bad.toml && systemctl restart cna-agent", timeout=180)
            _wait_active(c, 60)

            # -- purge: what the package installed goes; the VM, its definition and disk stay ---
            # The embedded driver keeps persistent definitions in <root>/etc/qemu, like /etc/libvirt/qemu.
            vm_xml = _sh(c, f"grep -rls '<uuid>{nested_uuid}</uuid>' /var/lib/cna-agent/libvirt/etc/qemu/ || true")
            assert vm_xml.startswith("/var/lib/cna-agent/libvirt/etc/qemu/"), vm_xml
            _sh(c, "DEBIAN_FRONTEND=noninteractive apt-get purge -y cna-agent", timeout=300)
            assert _sh(c, "dpkg -s cna-agent >/dev/null 2>&1 && echo installed || echo absent") == "absent"
            for path in ("/usr/bin/cna-agent", "/usr/bin/cna-ctl", "/lib/systemd/system/cna-agent.service",
                         "/etc/cna-agent/agent.toml", "/etc/default/cna-agent", "/usr/lib/tmpfiles.d/cna-agent.conf",
                         "/usr/lib/python3/dist-packages/cna_agent"):
                assert _sh(c, f"test -e {path} && echo present || echo gone") == "gone", path
            assert _show(c, "LoadState")["LoadState"] == "not-found"
            assert not _sh(c, "pgrep -f 'cna-agent serve' || true")
            assert _qemu_pids(c) == [qemu_pid]
            assert _sh(c, f"test -f {vm_xml.splitlines()[0]} && test -f /var/lib/cna-images/nested.qcow2 && echo kept") == "kept"
            # The admin's own drop-in is theirs: dpkg leaves it (and so its directory).
            assert _sh(c, "ls /etc/cna-agent/agent.toml.d/") == "10-local.toml"
