"""marks.write_metadata on libvirt's test driver: a live mark lives in the running domain's
definition only (it must go with the QEMU process), a config mark in the persistent one."""

from __future__ import annotations

import pytest

libvirt = pytest.importorskip("libvirt")

from cna_agent.compute.marks import read_config_metadata, write_metadata  # noqa: E402

NS = "https://cna-agent.org/xmlns/test-mark/1.0"


def test_a_live_mark_is_in_the_running_definition_only_and_a_config_mark_in_the_persistent_one():
    conn = libvirt.open("test:///default")
    try:
        dom = conn.lookupByName("test")  # running and persistent
        write_metadata(dom, NS, "tm", "<seen version='7.2'/>", live=True)
        assert "version=\"7.2\"" in dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        assert read_config_metadata(dom, NS) is None
        write_metadata(dom, NS, "tm", "<kept/>")
        assert read_config_metadata(dom, NS) == "<kept/>"
        write_metadata(dom, NS, "tm", None, live=True)
        write_metadata(dom, NS, "tm", None, live=True)  # already gone: done
        with pytest.raises(libvirt.libvirtError):
            dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        assert read_config_metadata(dom, NS) == "<kept/>"
    finally:
        conn.close()
