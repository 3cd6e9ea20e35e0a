"""Mutual TLS on the VRM listener, with certificates made by openssl for the test."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from cna_agent.api import pb
from support.pki import openssl


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, cn, ext in (("server", "node-1", ["-extfile", "san.ext"]), ("client", "vrm-1", []), ("rogue", "rogue", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
        if name == "rogue":  # signed by its own key: not by our CA
            openssl("x509", "-req", "-in", f"{name}.csr", "-signkey", f"{name}.key", "-out", f"{name}.pem", "-days", "2", cwd=d)
        else:
            openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                    "-out", f"{name}.pem", "-days", "2", *ext, cwd=d)
    return d


def _creds(pki: Path, client: str | None) -> grpc.ChannelCredentials:
    ca = (pki / "ca.pem").read_bytes()
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=ca)
    return grpc.ssl_channel_credentials(ca, (pki / f"{client}.key").read_bytes(), (pki / f"{client}.pem").read_bytes())


def _caps(channel: grpc.Channel):
    return pb.host_pb2_grpc.HostServiceStub(channel).GetCapabilities(pb.host_pb2.GetCapabilitiesRequest(), timeout=10)


def test_mutual_tls_admits_only_clients_signed_by_the_ca(agent_factory, pki):
    agent = agent_factory("tls", extra_config=f'[tls]\ncert = "{pki}/server.pem"\nkey = "{pki}/server.key"\nca = "{pki}/ca.pem"\n')
    target = f"127.0.0.1:{agent.tcp_port}"
    with grpc.secure_channel(target, _creds(pki, "client")) as ch:
        assert _caps(ch).host_uuid
    for bad in (None, "rogue"):
        with grpc.secure_channel(target, _creds(pki, bad)) as ch:
            with pytest.raises(grpc.RpcError) as info:
                _caps(ch)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(target) as ch:
        with pytest.raises(grpc.RpcError):
            _caps(ch)
    # The local socket stays plaintext for cna-ctl (root-only by file permissions).
    with agent.channel() as ch:
        assert _caps(ch).host_uuid
    assert agent.stop() == 0
    assert "caller=cn=vrm-1" in agent.log_text()
