"""The VRM link over mutual TLS: the real agent process against the real tools/vrm-sim, with
certificates made by openssl for the test (as tests/e2e/test_tls.py does for the agent's own
listener).

A production VRM requires client certificates: the agent registers with one signed by the
VRM's CA, and a host whose certificate the VRM's CA did not sign is refused, as is a VRM whose
server certificate the agent's CA did not sign. Refusals show on GetVrmStatus as a
disconnected link with the TLS failure in last_error, never as a crash.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from cna_agent.api import pb
from support.agent import free_port, start_agent
from support.pki import openssl
from support.vrm import SimProcess, vrm_status
from support.waiting import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the embedded QEMU driver here needs root")


def _pki(d: Path) -> Path:
    """Two CAs: 'ca' (the site's) and 'other' (someone else's), and certificates from each."""
    for ca in ("ca", "other"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
                "-subj", f"/CN={ca}", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ca, cn in (("vrm", "ca", "vrm-1"), ("node", "ca", "node-1"), ("rogue-node", "other", "node-x"),
                         ("rogue-vrm", "other", "vrm-x")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    return d


def _vrm_config(port: int, pki: Path, node: str, ca: str) -> str:
    return (f'[vrm]\naddress = "127.0.0.1:{port}"\ncert = "{pki}/{node}.pem"\nkey = "{pki}/{node}.key"\n'
            f'ca = "{pki}/{ca}.pem"\nheartbeat_interval_s = 1.0\nbackoff_min_s = 0.2\nbackoff_max_s = 1.0\n')


@pytest.mark.slow
def test_vrm_link_uses_mutual_tls_and_refuses_strangers_both_ways(libvirt_caps_cache):
    base = Path(tempfile.mkdtemp(prefix="cvt", dir="/tmp"))
    pki = base / "pki"
    pki.mkdir()
    _pki(pki)
    port = free_port()
    sim = SimProcess(base, port, base / "vrm.db",
                     ("--cert", str(pki / "vrm.pem"), "--key", str(pki / "vrm.key"), "--ca", str(pki / "ca.pem")))
    agents = []
    try:
        sim.start()
        # A host with a certificate from the site's CA registers and streams.
        good = start_agent(base / "good", libvirt_caps_cache, tcp=False, extra_config=_vrm_config(port, pki, "node", "ca"))
        agents.append(good)
        host = wait_for(lambda: (sim.query("SELECT host_uuid FROM hosts WHERE connected = 1") or [[None]])[0][0], 30,
                          "registration over mutual TLS")
        wait_for(lambda: vrm_status(good).state == pb.agent_pb2.VRM_LINK_STATE_CONNECTED and vrm_status(good).heartbeats_sent > 0,
                   30, "heartbeats over mutual TLS")
        # the events stream runs beside the heartbeats: its first batch may land a moment later
        wait_for(lambda: sim.query("SELECT count(*) FROM events WHERE host_uuid = ?", (host,))[0][0] > 0, 30,
                 "events over mutual TLS")

        # A host whose certificate the VRM's CA did not sign is refused by the VRM.
        rogue = start_agent(base / "rogue", libvirt_caps_cache, tcp=False,
                            extra_config=_vrm_config(port, pki, "rogue-node", "ca"))
        agents.append(rogue)
        status = wait_for(lambda: (lambda s: s if s.failures >= 2 else None)(vrm_status(rogue)), 30, "refusals of the rogue host")
        assert status.state != pb.agent_pb2.VRM_LINK_STATE_CONNECTED and status.connects == 0 and status.last_error
        assert "UNAVAILABLE" in status.last_error  # the VRM closes the handshake
        # A VRM the agent's CA does not vouch for is refused by the agent.
        wary = start_agent(base / "wary", libvirt_caps_cache, tcp=False, extra_config=_vrm_config(port, pki, "node", "other"))
        agents.append(wary)
        status = wait_for(lambda: (lambda s: s if s.failures >= 2 else None)(vrm_status(wary)), 30, "refusals of the VRM")
        assert status.state != pb.agent_pb2.VRM_LINK_STATE_CONNECTED and status.connects == 0 and status.last_error
        assert "CERTIFICATE_VERIFY_FAILED" in status.last_error, status.last_error
        # Only the good host is known to the VRM.
        assert [r[0] for r in sim.query("SELECT host_uuid FROM hosts")] == [host]
        assert vrm_status(good).state == pb.agent_pb2.VRM_LINK_STATE_CONNECTED
    finally:
        for a in agents:
            a.stop()
        sim.kill()
        shutil.rmtree(base, ignore_errors=True)
