"""cna-ctl in a real terminal (tmux): Ctrl-C on a followed import asks whether to cancel it,
and a yes cancels it in the agent. Judged from the terminal's own screen (capture-pane), the
command's exit status as tmux reports it, /proc (qemu-img gone) and the datastore (no file).
The import's qemu-img is stopped (SIGSTOP) so the copy is still running when the keys come.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.waiting import wait_for
from support.procs import qemu_img_converting

pytestmark = [pytest.mark.needs_root]
MiB = 1 << 20


def _tmux(sock: str, *args: str) -> str:
    out = subprocess.run(["tmux", "-L", sock, "-f", "/dev/null", *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, (args, out.stderr)
    return out.stdout


def test_ctrl_c(agent_factory, tmp_path):  # a short name: QEMU-facing paths under tmp_path stay short
    ds, imp = tmp_path / "ds", tmp_path / "imp"
    ds.mkdir()
    imp.mkdir()
    agent = agent_factory("t", tcp=False, extra_config=(f'[storage.datastores.ds]\ntype = "dir"\npath = "{ds}"\n'
                                                          f'[storage.datastores.imp]\ntype = "dir"\npath = "{imp}"\n'))
    chunk = os.urandom(MiB)
    with open(imp / "big.raw", "wb") as fh:
        for _ in range(384):
            fh.write(chunk)
    sock = f"cnatest{os.getpid()}"
    # The exit code is written by a shell around cna-ctl (tmux's pane_dead_status was seen
    # empty in CI, twice, after the pane died). ``trap 'true' INT`` keeps the shell waiting
    # through Ctrl-C, and exec resets a trap with a command, so cna-ctl gets SIGINT as usual.
    rc_file = tmp_path / "rc"
    ctl = " ".join(shlex.quote(a) for a in (sys.executable, "-m", "cna_agent.cli.main", "--socket", str(agent.socket),
                                            "volume", "import", "imp/big.raw", "ds/t/root.qcow2"))
    _tmux(sock, "new-session", "-d", "-s", "ctl", "-x", "80", "-y", "30",
          "sh", "-c", f"trap 'true' INT; {ctl}; echo $? > {shlex.quote(str(rc_file))}")
    try:
        _tmux(sock, "set-option", "-t", "ctl", "remain-on-exit", "on")
        pids = wait_for(lambda: qemu_img_converting(ds), 60, "qemu-img convert running")
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        screen = lambda: _tmux(sock, "capture-pane", "-p", "-J", "-t", "ctl")  # noqa: E731
        wait_for(lambda: "converting" in screen(), 60, "the progress line on the terminal")
        _tmux(sock, "send-keys", "-t", "ctl", "C-c")
        try:
            wait_for(lambda: "Cancel volume.import" in screen() and "[y/N]" in screen(), 30, "the cancel question")
        except AssertionError:
            raise AssertionError(f"no cancel question; the terminal shows:\n{screen()}") from None
        _tmux(sock, "send-keys", "-t", "ctl", "y", "Enter")
        wait_for(lambda: _tmux(sock, "display-message", "-p", "-t", "ctl", "#{pane_dead}").strip() == "1", 60,
                 "the command to end")
        text = screen()
        assert "(volume.import) cancelled" in text, text
        wait_for(lambda: rc_file.exists() and rc_file.read_text().strip() != "", 30, "the shell to record the exit code")
        assert rc_file.read_text().strip() == "130"
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(Path(f"/proc/{p}").exists() for p in pids)
        assert [f for _, _, fs in os.walk(ds) for f in fs if not f.startswith(".cna-probe")] == []
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True, timeout=30)
        for pid in qemu_img_converting(ds):  # a stopped qemu-img a failed run left behind
            os.kill(pid, signal.SIGKILL)
