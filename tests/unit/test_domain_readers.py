"""The modules that read a live domain's disks do it through domxml.Domain (no XPath of their
own): io_resume (which host path each target opened) and snapshots (which disks can take an
overlay). The document is shaped like ``virsh dumpxml`` of a running guest: aliases, addresses,
backing chains and elements the model does not cover are ignored."""

from __future__ import annotations

from cna_agent.compute import domxml as dx
from cna_agent.compute import snapshots as snaps
from cna_agent.compute.io_resume import _disk_sources

LIVE = """<domain type='kvm' id='7'>
  <name>vm1</name>
  <uuid>6f1c3a52-8d0e-4b7a-9c1d-2e3f4a5b6c7d</uuid>
  <memory unit='KiB'>1048576</memory>
  <vcpu placement='static'>2</vcpu>
  <resource><partition>/machine</partition></resource>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' error_policy='stop' io='native'/>
      <source file='/srv/ds/vm1-root.live1.qcow2' index='2'/>
      <backingStore type='file' index='1'>
        <format type='qcow2'/>
        <source file='/srv/ds/vm1-root.qcow2'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x03' slot='0x00' function='0x0'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none' error_policy='stop'/>
      <source dev='/dev/disk/by-id/wwn-0x6001405abcdef' index='3'/>
      <backingStore/>
      <target dev='vdb' bus='virtio'/>
      <alias name='virtio-disk1'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <auth username='chap'><secret type='iscsi' uuid='0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f'/></auth>
      <source protocol='iscsi' name='iqn.2024-01.org.example:store/1' index='4'>
        <host name='192.0.2.10' port='3260'/>
      </source>
      <target dev='vdc' bus='virtio'/>
      <alias name='virtio-disk2'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
      <alias name='sata0-0-0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/srv/ds/quorum.raw' index='5'/>
      <target dev='vdd' bus='virtio'/>
      <shareable/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/srv/ds/nodriver.img'/>
      <target dev='vde' bus='virtio'/>
    </disk>
    <channel type='unix'>
      <source mode='bind' path='/run/cna-agent/vm1.agent'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
      <alias name='channel0'/>
    </channel>
  </devices>
  <seclabel type='none' model='none'/>
</domain>
"""


def test_io_resume_reads_each_targets_host_path() -> None:
    assert _disk_sources(LIVE) == {"vda": "/srv/ds/vm1-root.live1.qcow2", "vdb": "/dev/disk/by-id/wwn-0x6001405abcdef",
                                   "vdc": "", "sda": "", "vdd": "/srv/ds/quorum.raw", "vde": "/srv/ds/nodriver.img"}
    assert _disk_sources("<domain><name>x</name></domain>") == {}


def test_snapshots_read_targets_paths_formats_and_writability() -> None:
    domain = dx.Domain.from_xml(LIVE)
    assert snaps._disks(domain) == [
        ("vda", "/srv/ds/vm1-root.live1.qcow2", "qcow2", True),
        ("vdb", "/dev/disk/by-id/wwn-0x6001405abcdef", "raw", True),
        ("vdc", "", "raw", True),
        ("sda", "", "raw", False),
        ("vdd", "/srv/ds/quorum.raw", "raw", False),
        ("vde", "/srv/ds/nodriver.img", "raw", True),
    ]
    assert snaps._has_guest_agent(domain)
    assert snaps._disks(dx.Domain.from_xml("<domain><name>x</name></domain>")) == []
