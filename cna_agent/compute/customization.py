"""First-boot customization: what the caller asks a new VM's guest to become (hostname, users,
SSH keys, per-NIC addresses, DNS, user data; or a Windows answer file), checked, and written
as the files the guest's own first-boot tool reads.

Why cloud-init's NoCloud and not the agent typing into the guest: every Linux cloud image
(Debian, Ubuntu, openEuler, EulerOS) ships cloud-init, which reads a drive labelled ``cidata``
holding ``meta-data``, ``user-data`` and ``network-config`` on its first boot, with no network
and no agent in the guest; nova's config drive and Proxmox's cloud-init drive do the same.
Windows Setup reads ``autounattend.xml`` from the root of removable media the same way.

The files are JSON (YAML 1.2 is a superset; cloud-init loads them with a YAML parser), so
nothing the caller sends can break out of a string or add a key. Passwords are only ever
crypt(3) hashes: no clear-text password is accepted, stored or written to the drive. User data
the caller supplies goes after the agent's own cloud-config as a second MIME part, so both
apply (cloud-init merges cloud-config parts and runs script parts).

``validate()`` raises ``InvalidArgument("customization.<field>", ...)`` before anything is
made: a bad request changes nothing.
"""

from __future__ import annotations

import ipaddress
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

from cna_agent.compute.guest_passwords import CRYPTED_RE
from cna_agent.compute.spec import VmSpec
from cna_agent.errors import InvalidArgument

MAX_USERS = 16
MAX_KEYS = 32
MAX_KEY_LEN = 16384
MAX_ADDRESSES = 16
MAX_ROUTES = 32
MAX_DNS = 8
MAX_USER_DATA = 256 * 1024
MAX_UNATTEND = 512 * 1024
#: A hostname: dot-separated RFC 1123 labels, 253 characters at most.
_LABEL_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
#: POSIX account names (useradd's default rule), not root: root is customized by password only.
_POSIX_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_SSH_KEY_RE = re.compile(r"^(ssh-(rsa|ed25519|dss)|ecdsa-sha2-nistp(256|384|521)|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com)"
                         r" [A-Za-z0-9+/]+={0,3}( [^\x00-\x1f\x7f]{0,255})?$")
_SEARCH_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
UNATTEND_NS = "urn:schemas-microsoft-com:unattend"
#: Written by the first boot when it configured NICs (see _cloud_config).
KEEP_NETWORK_PATH = "/etc/cloud/cloud.cfg.d/99-cna-keep-network.cfg"


@dataclass
class GuestUser:
    name: str = ""
    #: crypt(3) hash ($6$..., $y$...); empty: the account has no password (SSH keys only).
    password_hash: str = ""
    ssh_authorized_keys: list[str] = field(default_factory=list)
    #: Passwordless sudo for every command.
    sudo: bool = False


@dataclass
class GuestRoute:
    to: str = ""  # CIDR, e.g. 198.51.100.0/24 or 0.0.0.0/0
    via: str = ""


@dataclass
class GuestNicConfig:
    #: Which NIC of the spec (its index in spec.nics); matched in the guest by its MAC.
    nic_index: int = 0
    dhcp: bool = False
    addresses: list[str] = field(default_factory=list)  # CIDR: 192.0.2.10/24, 2001:db8::5/64
    gateway4: str = ""
    gateway6: str = ""
    routes: list[GuestRoute] = field(default_factory=list)


@dataclass
class GuestCustomization:
    hostname: str = ""
    users: list[GuestUser] = field(default_factory=list)
    nics: list[GuestNicConfig] = field(default_factory=list)
    dns_servers: list[str] = field(default_factory=list)
    dns_search: list[str] = field(default_factory=list)
    #: The caller's own cloud-config or script, applied after the agent's part (Linux).
    user_data: str = ""
    #: Windows: the whole answer file (the agent does not edit it).
    windows_unattend_xml: str = ""

    def empty(self) -> bool:
        return self == GuestCustomization()


def is_windows(spec: VmSpec) -> bool:
    return spec.os_family == "windows"


# -- validation -------------------------------------------------------------------------------


def _ip(value: str, path: str, *, cidr: bool) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface | ipaddress._BaseAddress:
    try:
        got = ipaddress.ip_interface(value) if cidr else ipaddress.ip_address(value)
    except ValueError:
        got = None
    if got is None or (cidr and "/" not in value):
        want = "an address with its prefix, like 192.0.2.10/24" if cidr else "an IP address like 192.0.2.1"
        raise InvalidArgument(path, f"{value!r} is not {want}")
    return got


def _check_user(u: GuestUser, p: str, windows: bool) -> None:
    if not _POSIX_USER_RE.match(u.name) and u.name != "root":
        raise InvalidArgument(f"{p}.name", "must be a POSIX account name: 1-32 of a-z 0-9 _ -, starting with a letter or _")
    if u.password_hash and not CRYPTED_RE.match(u.password_hash):
        raise InvalidArgument(f"{p}.password_hash", "must be a crypt(3) hash such as $6$salt$hash (no clear-text password "
                                                    "is accepted)")
    if len(u.ssh_authorized_keys) > MAX_KEYS:
        raise InvalidArgument(f"{p}.ssh_authorized_keys", f"at most {MAX_KEYS} keys")
    for j, key in enumerate(u.ssh_authorized_keys):
        if len(key) > MAX_KEY_LEN or not _SSH_KEY_RE.match(key):
            raise InvalidArgument(f"{p}.ssh_authorized_keys[{j}]", "is not one OpenSSH public key line "
                                                                   "(type, base64 key, optional comment)")
    if u.name == "root" and u.sudo:
        raise InvalidArgument(f"{p}.sudo", "root needs no sudo rule")


def _check_nic(n: GuestNicConfig, p: str, nics: int) -> None:
    if not 0 <= n.nic_index < nics:
        raise InvalidArgument(f"{p}.nic_index", f"{n.nic_index} names no NIC (the spec has {nics})")
    if len(n.addresses) > MAX_ADDRESSES:
        raise InvalidArgument(f"{p}.addresses", f"at most {MAX_ADDRESSES} addresses")
    if n.dhcp and n.addresses:
        raise InvalidArgument(f"{p}.addresses", "a NIC is either DHCP or static, not both")
    if not n.dhcp and not n.addresses:
        raise InvalidArgument(f"{p}.addresses", "a NIC without DHCP needs at least one address")
    versions: set[int] = set()
    for j, a in enumerate(n.addresses):
        iface = _ip(a, f"{p}.addresses[{j}]", cidr=True)
        if iface.ip.is_multicast or iface.ip.is_unspecified or iface.ip.is_loopback:
            raise InvalidArgument(f"{p}.addresses[{j}]", f"{a!r} is not a unicast host address")
        versions.add(iface.version)
    for gw, version, name in ((n.gateway4, 4, "gateway4"), (n.gateway6, 6, "gateway6")):
        if gw:
            if _ip(gw, f"{p}.{name}", cidr=False).version != version:
                raise InvalidArgument(f"{p}.{name}", f"{gw!r} is not an IPv{version} address")
            if version not in versions:
                raise InvalidArgument(f"{p}.{name}", f"the NIC has no IPv{version} address to reach it from")
    if len(n.routes) > MAX_ROUTES:
        raise InvalidArgument(f"{p}.routes", f"at most {MAX_ROUTES} routes")
    for j, r in enumerate(n.routes):
        try:
            net = ipaddress.ip_network(r.to, strict=True)
        except ValueError:
            raise InvalidArgument(f"{p}.routes[{j}].to", f"{r.to!r} is not a network like 198.51.100.0/24") from None
        if _ip(r.via, f"{p}.routes[{j}].via", cidr=False).version != net.version:
            raise InvalidArgument(f"{p}.routes[{j}].via", f"{r.via!r} is not of the route's IP version")


def _check_unattend(text: str) -> None:
    p = "customization.windows_unattend_xml"
    if len(text.encode()) > MAX_UNATTEND:
        raise InvalidArgument(p, f"at most {MAX_UNATTEND} bytes")
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise InvalidArgument(p, "must not declare a DOCTYPE or entities")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise InvalidArgument(p, f"is not well-formed XML ({exc})") from None
    if root.tag != f"{{{UNATTEND_NS}}}unattend":
        raise InvalidArgument(p, f"the root element must be <unattend xmlns=\"{UNATTEND_NS}\">")


def validate(c: GuestCustomization, spec: VmSpec) -> None:
    """Check ``c`` for ``spec`` (its NICs and OS family); see the module docstring."""
    if is_windows(spec):
        linux_only = [n for n, v in (("hostname", c.hostname), ("users", c.users), ("nics", c.nics),
                                     ("dns_servers", c.dns_servers), ("dns_search", c.dns_search),
                                     ("user_data", c.user_data)) if v]
        if linux_only:
            raise InvalidArgument(f"customization.{linux_only[0]}", "a Windows guest is customized by its answer file "
                                                                   "alone (windows_unattend_xml)")
        if not c.windows_unattend_xml:
            raise InvalidArgument("customization.windows_unattend_xml", "is required to customize a Windows guest")
        _check_unattend(c.windows_unattend_xml)
        return
    if c.windows_unattend_xml:
        raise InvalidArgument("customization.windows_unattend_xml", f"is for Windows guests; this one is "
                                                                    f"{spec.os_family or 'linux'} (use the other fields)")
    if c.hostname:
        labels = c.hostname.split(".")
        if len(c.hostname) > 253 or not all(_LABEL_RE.match(x) for x in labels) or labels[0].isdigit():
            raise InvalidArgument("customization.hostname", "must be RFC 1123 labels (a-z 0-9 -) joined by dots, "
                                                            "at most 253 characters")
    if len(c.users) > MAX_USERS:
        raise InvalidArgument("customization.users", f"at most {MAX_USERS} users")
    names = [u.name for u in c.users]
    for i, u in enumerate(c.users):
        _check_user(u, f"customization.users[{i}]", False)
        if names.index(u.name) != i:
            raise InvalidArgument(f"customization.users[{i}].name", f"{u.name!r} is listed twice")
    seen: set[int] = set()
    for i, n in enumerate(c.nics):
        _check_nic(n, f"customization.nics[{i}]", len(spec.nics))
        if n.nic_index in seen:
            raise InvalidArgument(f"customization.nics[{i}].nic_index", f"NIC {n.nic_index} is configured twice")
        seen.add(n.nic_index)
    if len(c.dns_servers) > MAX_DNS or len(c.dns_search) > MAX_DNS:
        raise InvalidArgument("customization.dns_servers" if len(c.dns_servers) > MAX_DNS else "customization.dns_search",
                              f"at most {MAX_DNS} entries")
    for j, s in enumerate(c.dns_servers):
        _ip(s, f"customization.dns_servers[{j}]", cidr=False)
    for j, s in enumerate(c.dns_search):
        if not _SEARCH_RE.match(s) or ".." in s:
            raise InvalidArgument(f"customization.dns_search[{j}]", f"{s!r} is not a DNS domain")
    if (c.dns_servers or c.dns_search) and not c.nics:
        raise InvalidArgument("customization.dns_servers", "DNS is set per NIC configuration: configure a NIC too")
    if len(c.user_data.encode()) > MAX_USER_DATA:
        raise InvalidArgument("customization.user_data", f"at most {MAX_USER_DATA} bytes")
    if "\x00" in c.user_data:
        raise InvalidArgument("customization.user_data", "must be text (no NUL)")
    if c.empty():
        raise InvalidArgument("customization", "is empty: leave it out instead")


# -- the files on the drive --------------------------------------------------------------------


def _dump(header: str, data: object) -> bytes:
    return (header + json.dumps(data, indent=1, ensure_ascii=False, sort_keys=True) + "\n").encode()


def _cloud_config(c: GuestCustomization) -> dict:
    cfg: dict = {}
    if c.hostname:
        cfg.update(hostname=c.hostname.split(".")[0], preserve_hostname=False)
        if "." in c.hostname:
            cfg.update(fqdn=c.hostname, prefer_fqdn_over_hostname=False)
    users: list = ["default"] if not c.users else []
    for u in c.users:
        if u.name == "root":
            continue
        entry: dict = {"name": u.name, "shell": "/bin/bash", "lock_passwd": not u.password_hash}
        if u.password_hash:
            entry["hashed_passwd"] = u.password_hash
        if u.ssh_authorized_keys:
            entry["ssh_authorized_keys"] = list(u.ssh_authorized_keys)
        if u.sudo:
            entry["sudo"] = "ALL=(ALL) NOPASSWD:ALL"
        users.append(entry)
    if c.users:
        cfg["users"] = users
    if c.nics:
        # Later boots have no drive: cloud-init then finds no datasource and writes its fallback
        # (DHCP on the first NIC) over the static configuration it wrote now. Seen on Debian 12:
        # the address was gone on the second boot. Its own switch keeps what this boot wrote.
        cfg["write_files"] = [{"path": KEEP_NETWORK_PATH, "permissions": "0644", "content": "network: {config: disabled}\n"}]
    root = next((u for u in c.users if u.name == "root"), None)
    if root is not None:
        if root.password_hash:
            # chpasswd -e: the hash is set as is; ssh_pwauth stays the image's own choice.
            cfg["chpasswd"] = {"expire": False, "list": f"root:{root.password_hash}"}
        if root.ssh_authorized_keys:
            cfg["disable_root"] = False
            cfg["ssh_authorized_keys"] = list(root.ssh_authorized_keys)
    return cfg


def network_config(c: GuestCustomization, spec: VmSpec) -> dict:
    """cloud-init network config version 2 (netplan's schema): each NIC matched by its MAC."""
    ethernets: dict = {}
    for n in c.nics:
        mac = spec.nics[n.nic_index].mac
        eth: dict = {"match": {"macaddress": mac}, "set-name": f"eth{n.nic_index}"}
        if n.dhcp:
            eth.update(dhcp4=True, dhcp6=False)
        else:
            eth["addresses"] = list(n.addresses)
            if n.gateway4:
                eth["gateway4"] = n.gateway4
            if n.gateway6:
                eth["gateway6"] = n.gateway6
        if n.routes:
            eth["routes"] = [{"to": r.to, "via": r.via} for r in n.routes]
        if c.dns_servers or c.dns_search:
            eth["nameservers"] = {"addresses": list(c.dns_servers), "search": list(c.dns_search)}
        ethernets[f"nic{n.nic_index}"] = eth
    return {"version": 2, "ethernets": ethernets}


def nocloud_files(c: GuestCustomization, spec: VmSpec, instance_id: str) -> dict[str, bytes]:
    """meta-data, user-data and (with NICs) network-config for cloud-init's NoCloud source."""
    meta = {"instance-id": instance_id, "local-hostname": (c.hostname or spec.name).split(".")[0]}
    files = {"meta-data": _dump("", meta)}
    agent_part = _dump("#cloud-config\n", _cloud_config(c))
    if c.user_data:
        mime = MIMEMultipart()
        mime.attach(MIMEText(agent_part.decode(), "cloud-config", "utf-8"))
        kind = "x-shellscript" if c.user_data.startswith("#!") else "cloud-config"
        part = MIMEText(c.user_data, kind, "utf-8")
        if kind == "cloud-config":
            # The caller's lists (write_files, runcmd, users...) add to the agent's instead of
            # replacing them; the agent's keys (hostname, chpasswd) stay as the API asked.
            part["Merge-Type"] = "list(append)+dict(no_replace,recurse_list)+str()"
        mime.attach(part)
        files["user-data"] = mime.as_bytes()
    else:
        files["user-data"] = agent_part
    if c.nics:
        files["network-config"] = _dump("", network_config(c, spec))
    return files


def unattend_files(c: GuestCustomization) -> dict[str, bytes]:
    """Windows Setup looks for autounattend.xml at the root of removable media."""
    return {"autounattend.xml": c.windows_unattend_xml.encode()}
