"""Bulk VM stats: parsing libvirt's flat keys into samples, rates from deltas, the sampler.

The parsing tests feed dicts in the exact key format virConnectGetAllDomainStats returns for
a QEMU domain (built here, with round numbers so the expected rates are obvious); the sampler
test runs the real bulk call against libvirt's test driver (test:///default), which answers
the "state" group.
"""

from __future__ import annotations

import asyncio

import libvirt
import pytest

from cna_agent.vrm.stats import StatsSampler, bulk_call, parse_groups, parse_record, stats_flags
from support.stats import qemu_like


def test_first_sample_has_counters_and_no_rates():
    s = parse_record("u1", "vm1", qemu_like(10, 1000, 2000, 300, 400), None, 0.0)
    assert (s.state, s.reason) == ("running", "booted")
    assert s.cpu_time_ns == 10_000_000_000 and s.cpu_percent == 0.0
    assert (s.vcpus_current, s.vcpus_maximum) == (2, 4)
    assert [(v.id, v.state, v.time_ns) for v in s.vcpus] == [(0, 1, 5_000_000_000), (1, 1, 6_000_000_000)]
    assert s.balloon_current_kib == 262144 and s.rss_kib == 180000
    assert [d.name for d in s.disks] == ["vda", "sda"] and s.disks[0].capacity_bytes == 1 << 30
    assert s.disks[0].read_bytes_per_s == 0.0 and s.nics[0].rx_bytes_per_s == 0.0
    assert s.nics[0].name == "vnet0" and s.nics[0].rx_dropped == 1


def test_rates_are_deltas_over_the_interval():
    a = parse_record("u1", "vm1", qemu_like(10, 1000, 2000, 300, 400), None, 0.0)
    b = parse_record("u1", "vm1", qemu_like(15, 1000 + 10 * 4096, 2000 + 10 * 8192, 300 + 10 * 100, 400 + 10 * 50), a, 10.0)
    assert b.cpu_percent == 50.0  # 5 s of CPU in 10 s = half a host CPU
    assert b.disks[0].read_bytes_per_s == 4096 and b.disks[0].write_bytes_per_s == 8192
    assert b.nics[0].rx_bytes_per_s == 100 and b.nics[0].tx_bytes_per_s == 50


def test_counter_that_went_backwards_gives_zero_not_a_negative_rate():
    a = parse_record("u1", "vm1", qemu_like(100, 10**9, 10**9, 10**9, 10**9), None, 0.0)
    b = parse_record("u1", "vm1", qemu_like(1, 0, 0, 0, 0), a, 10.0)  # QEMU restarted
    assert b.cpu_percent == 0 and b.disks[0].read_bytes_per_s == 0 and b.nics[0].tx_bytes_per_s == 0


def test_state_mapping_uses_compute_table():
    s = parse_record("u", "n", {"state.state": libvirt.VIR_DOMAIN_PAUSED, "state.reason": libvirt.VIR_DOMAIN_PAUSED_IOERROR}, None, 0)
    assert (s.state, s.reason) == ("paused", "ioerror")
    assert parse_record("u", "n", {}, None, 0).state == "unknown"  # "state" group not asked for


def test_groups_are_validated_and_mapped_to_flags():
    assert parse_groups(" state, cpu-total ,state") == ("state", "cpu-total")
    assert stats_flags(("state", "block")) == libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_BLOCK
    with pytest.raises(ValueError, match="memory"):
        parse_groups("state,memory")


def test_stats_config_errors_name_the_key(tmp_path):
    from cna_agent.config import ConfigError, load_config

    for body, key in (('[stats]\nvm_stats = "state,bogus"\n', "stats.vm_stats"), ("[stats]\ninterval_s = 0.5\n", "stats.interval_s"),
                      ('[metrics]\nlisten = "0.0.0.0:9100"\n', "metrics.listen")):
        cfg = tmp_path / "agent.toml"
        cfg.write_text(body)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(cfg, environ={})
    cfg.write_text('[metrics]\nlisten = "0.0.0.0:9100"\nallow_remote = true\n')
    assert load_config(cfg, environ={}).metrics.allow_remote


def test_sampler_runs_the_bulk_call_on_libvirts_test_driver():
    conn = libvirt.open("test:///default")
    try:
        async def call(fn):
            return await asyncio.get_running_loop().run_in_executor(None, fn, conn)

        async def scenario():
            sampler = StatsSampler(call, interval_s=1, groups=parse_groups("state,cpu-total,vcpu,balloon,block,interface"))
            first = await sampler.sample()
            await asyncio.sleep(0.05)
            second = await sampler.sample()
            return first, second

        first, second = asyncio.run(scenario())
        names = {d.name(): d.UUIDString() for d in conn.listAllDomains()}
        assert {(v.name, v.uuid) for v in second.vms} == set(names.items())
        assert all(v.state == "running" for v in second.vms)  # the test driver's "test" domain runs
        assert first.interval_s == 0 and second.interval_s > 0
        assert bulk_call(conn, stats_flags(("state",)))[0][2]["state.state"] == libvirt.VIR_DOMAIN_RUNNING
    finally:
        conn.close()
