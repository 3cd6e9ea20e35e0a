"""Config loading: defaults, files, drop-ins, env overrides, and errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cna_agent.config import AgentConfig, ConfigError, load_config


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_without_a_file_are_valid(tmp_path):
    cfg = load_config(tmp_path / "absent.toml", environ={}, require_file=False)
    assert cfg == AgentConfig()
    assert cfg.grpc.listen == "127.0.0.1:7443"
    assert cfg.grpc.unix_socket == "/run/cna-agent/cna-agent.sock"
    assert cfg.libvirt.uri == ""


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


def test_file_dropins_and_env_apply_in_order(tmp_path):
    cfg_file = write(tmp_path / "agent.toml", '[grpc]\nlisten = "127.0.0.1:1000"\n[state]\ndir = "/srv/a"\n')
    (tmp_path / "agent.toml.d").mkdir()
    write(tmp_path / "agent.toml.d" / "10-a.toml", '[grpc]\nlisten = "127.0.0.1:2000"\n')
    write(tmp_path / "agent.toml.d" / "20-b.toml", '[grpc]\nlisten = "127.0.0.1:3000"\n[libvirt]\nexecutor_threads = 4\n')
    cfg = load_config(cfg_file, environ={"CNA_AGENT_STATE_DIR": "/srv/env", "CNA_AGENT_LIBVIRT_CALL_TIMEOUT_S": "12"})
    assert cfg.grpc.listen == "127.0.0.1:3000"  # last drop-in wins
    assert cfg.libvirt.executor_threads == 4
    assert cfg.state.dir == "/srv/env"  # env beats files
    assert cfg.libvirt.call_timeout_s == 12.0
    assert cfg.sources == (str(cfg_file), str(tmp_path / "agent.toml.d" / "10-a.toml"), str(tmp_path / "agent.toml.d" / "20-b.toml"))


@pytest.mark.parametrize(
    "text, key",
    [
        ("[grpc]\nlistn = '1'\n", "grpc.listn"),
        ("[grcp]\nlisten = '1'\n", "[grcp]"),
        ("[grpc]\nlisten = 7443\n", "grpc.listen"),
        ("[grpc]\nlisten = 'nohost'\n", "grpc.listen"),
        ("[grpc]\nlisten = '127.0.0.1:99999'\n", "grpc.listen"),
        ("[grpc]\nlisten = '0.0.0.0:7443'\n", "grpc.listen"),  # non-loopback without TLS
        ("[libvirt]\nvirt_type = 'xen'\n", "libvirt.virt_type"),
        ("[libvirt]\nexecutor_threads = 0\n", "libvirt.executor_threads"),
        ("[tls]\ncert = '/a.pem'\n", "tls.key is missing"),
        ("[tls]\nca = '/ca.pem'\n", "tls.ca"),
        ("[state]\ndir = 'relative'\n", "state.dir"),
        ("[host]\nreserved_cpus = '0-x'\n", "host.reserved_cpus"),
        ("[log]\nlevel = 'loud'\n", "log.level"),
        ("[grpc]\nallow_insecure_tcp = 'yes'\n", "grpc.allow_insecure_tcp"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_bad_values_name_the_key_and_file(tmp_path, text, key):
    cfg_file = write(tmp_path / "agent.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(cfg_file, environ={})
    assert key in str(info.value)
    assert str(cfg_file) in str(info.value)


def test_bad_env_value_names_the_variable(tmp_path):
    with pytest.raises(ConfigError, match="CNA_AGENT_GRPC_MAX_MESSAGE_MIB"):
        load_config(tmp_path / "x.toml", environ={"CNA_AGENT_GRPC_MAX_MESSAGE_MIB": "lots"}, require_file=False)


def test_non_loopback_allowed_with_tls_or_explicit_opt_in(tmp_path):
    tls = write(tmp_path / "a.toml", "[grpc]\nlisten = '0.0.0.0:7443'\n[tls]\ncert = '/c.pem'\nkey = '/k.pem'\nca = '/ca.pem'\n")
    assert load_config(tls, environ={}).tls.enabled
    opt_in = write(tmp_path / "b.toml", "[grpc]\nlisten = '[::]:7443'\nallow_insecure_tcp = true\n")
    assert load_config(opt_in, environ={}).grpc.allow_insecure_tcp


def test_check_config_prints_effective_config_and_round_trips(tmp_path):
    cfg_file = write(tmp_path / "agent.toml", "[grpc]\nlisten = ''\n[log]\nformat = 'json'\n")
    out = subprocess.run([sys.executable, "-m", "cna_agent.daemon", "check-config", "--config", str(cfg_file)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert 'format = "json"' in out.stdout
    assert 'listen = ""' in out.stdout
    # The printed config is itself a valid config file with the same values.
    again = write(tmp_path / "again.toml", out.stdout)
    assert load_config(again, environ={}).to_dict() == load_config(cfg_file, environ={}).to_dict()


def test_check_config_fails_with_one_line(tmp_path):
    cfg_file = write(tmp_path / "agent.toml", "[grpc]\nlisten = 'x'\n")
    out = subprocess.run([sys.executable, "-m", "cna_agent.daemon", "check-config", "--config", str(cfg_file)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert out.stderr.count("\n") == 1 and "grpc.listen" in out.stderr
