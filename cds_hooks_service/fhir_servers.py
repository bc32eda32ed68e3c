"""Which FHIR servers the service may contact, and at which network address (SSRF protection).

* The allowlist: base URLs an operator trusts. In JWT mode each issuer entry of the ``CDS_JWT_ISSUERS`` file
  may carry ``"fhirServers": [...]``; in open mode ``CDS_FHIR_SERVERS`` lists them. A request's ``fhirServer``
  must equal one of its client's entries after :func:`normalise_base_url` (scheme and host lower case, the
  default port and trailing slashes dropped); anything else is never contacted.
* Every entry is ``https``, except on loopback (``localhost``, 127.0.0.0/8, ``[::1]``), has no user info,
  query or fragment.
* The address: the host is resolved once per hook call (inside its time budget) and the service connects to
  exactly the address that was checked (see fhir_transport.py). Only public (globally routable) addresses
  pass, unless the entry names the address itself (an IP literal such as ``https://10.1.2.3/fhir``; a
  ``localhost`` entry allows loopback) or the address lies in ``CDS_FHIR_PRIVATE_NETWORKS`` (CIDRs the
  operator lists for internal FHIR servers). So a trusted name whose DNS answer turns to 169.254.169.254,
  127.0.0.1 or a 10.x address (DNS rebinding) does not reach that address.

URLs are parsed with urllib3's parser, the one that connects (``urllib.parse`` reads some URLs differently,
e.g. ``http://a\\@b/`` is host ``b`` for urllib.parse and host ``a`` for urllib3).
"""
from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

DEFAULT_PORTS = {"http": 80, "https": 443}
Resolver = Callable[[str, int], list[str]]  # (host, port) -> IP addresses, in preference order
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class FhirServerRefused(Exception):
    """The FHIR server may not be contacted. ``reason`` is for logs: no URL, no patient data. ``resolved``:
    False when the name did not resolve (the server is unreachable rather than refused)."""

    def __init__(self, reason: str, *, resolved: bool = True):
        super().__init__(reason)
        self.reason, self.resolved = reason, resolved


@dataclass(frozen=True)
class Target:
    """A FHIR base URL split the way the connection will use it."""
    scheme: str
    host: str  # lower case; IPv6 without brackets
    port: int
    path: str  # no trailing slash; "" for the root

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if DEFAULT_PORTS[self.scheme] == self.port else f":{self.port}"
        return f"{self.scheme}://{host}{port}{self.path}"

    @property
    def literal_ip(self) -> IpAddress | None:
        try:
            return _unmap(ipaddress.ip_address(self.host))
        except ValueError:
            return None

    @property
    def is_loopback(self) -> bool:
        ip = self.literal_ip
        return self.host == "localhost" if ip is None else ip.is_loopback


def parse_target(url: object) -> Target:
    """Split an absolute http(s) URL with urllib3's parser. Raises ValueError (message without the URL)."""
    if not isinstance(url, str) or not url or len(url) > 2048 or any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise ValueError("not an absolute http(s) URL")
    try:
        u = parse_url(url)
    except (LocationParseError, ValueError):
        raise ValueError("not a parseable URL") from None
    scheme = (u.scheme or "").lower()
    if scheme not in DEFAULT_PORTS or not u.host:
        raise ValueError("not an absolute http(s) URL")
    if u.auth is not None:
        raise ValueError("user info (user@host) is not allowed in a FHIR server URL")
    host = u.host.lower().strip("[]").rstrip(".")
    if not host:
        raise ValueError("not an absolute http(s) URL")
    return Target(scheme, host, u.port or DEFAULT_PORTS[scheme], (u.path or "").rstrip("/"))


def normalise_base_url(url: object) -> str:
    """The canonical form of a FHIR base URL, for comparing a request's fhirServer with the allowlist."""
    if isinstance(url, str) and ("?" in url or "#" in url):
        raise ValueError("a FHIR base URL has no query or fragment")
    return parse_target(url).base_url


def check_allowlist_entry(url: object) -> str:
    """An allowlist entry, checked and normalised. Raises ValueError naming the problem."""
    try:
        target = parse_target(url)
        if isinstance(url, str) and ("?" in url or "#" in url):
            raise ValueError("a FHIR base URL has no query or fragment")
    except ValueError as exc:
        raise ValueError(f"FHIR server {url!r}: {exc}") from None
    if target.scheme != "https" and not target.is_loopback:
        raise ValueError(f"FHIR server {url!r} must use https (http only on loopback)")
    return target.base_url


def parse_server_list(text: str | None) -> tuple[str, ...]:
    """``CDS_FHIR_SERVERS``: base URLs separated by commas and/or whitespace."""
    return tuple(dict.fromkeys(check_allowlist_entry(u) for u in re.split(r"[\s,]+", text or "") if u))


def parse_entry_servers(value: object, where: str) -> tuple[str, ...]:
    """The ``fhirServers`` of an issuer entry (a JSON list of base URLs)."""
    if not isinstance(value, list) or not all(isinstance(u, str) for u in value):
        raise ValueError(f"{where}: 'fhirServers' must be a list of base URLs")
    try:
        return tuple(dict.fromkeys(check_allowlist_entry(u) for u in value))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def parse_networks(text: str | None) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``CDS_FHIR_PRIVATE_NETWORKS``: CIDRs (e.g. ``10.20.0.0/16``) separated by commas and/or whitespace."""
    out = []
    for item in re.split(r"[\s,]+", text or ""):
        if item:
            try:
                out.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"CDS_FHIR_PRIVATE_NETWORKS: {item!r} is not an IP network (e.g. 10.20.0.0/16)") \
                    from None
    return tuple(out)


def trusted_base(fhir_server: object, allowed: Iterable[str]) -> str | None:
    """The allowlist entry ``fhir_server`` names, or None when it is not on the list (or not a URL)."""
    try:
        wanted = normalise_base_url(fhir_server)
    except ValueError:
        return None
    for entry in allowed:
        try:
            if normalise_base_url(entry) == wanted:
                return wanted
        except ValueError:
            continue
    return None


# ---------------------------------------------------------------- addresses

def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def _unmap(ip: IpAddress) -> IpAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def address_allowed(ip: IpAddress, target: Target, networks: tuple = ()) -> bool:
    ip = _unmap(ip)
    if ip.is_unspecified or ip.is_multicast:
        return False
    if target.literal_ip is not None and ip == target.literal_ip:
        return True  # the operator listed this very address
    if target.host == "localhost" and ip.is_loopback:
        return True
    if any(ip.version == net.version and ip in net for net in networks):
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.is_site_local:  # fec0::/10: deprecated, but still routed inside some networks
            return False
        if ip.sixtofour is not None:  # 2002:AABB:CCDD::/48 reaches IPv4 AA.BB.CC.DD through a 6to4 relay
            return address_allowed(ip.sixtofour, target, networks)
    return ip.is_global and not (ip.is_private or ip.is_link_local or ip.is_loopback or ip.is_reserved)


def pick_address(target: Target, networks: tuple = (), resolver: Resolver | None = None) -> str:
    """Resolve ``target.host`` once and return the first address that may be contacted.

    Raises FhirServerRefused when the name does not resolve or no address is allowed.
    """
    if target.literal_ip is not None:
        candidates = [str(target.literal_ip)]
    else:
        try:
            candidates = (resolver or system_resolver)(target.host, target.port)
        except (OSError, UnicodeError) as exc:
            raise FhirServerRefused(f"name resolution failed ({type(exc).__name__})", resolved=False) from None
    refused = []
    for text in candidates:
        try:
            ip = ipaddress.ip_address(text.split("%")[0])
        except ValueError:
            continue
        if address_allowed(ip, target, networks):
            return str(_unmap(ip))
        refused.append(str(ip))
    if not refused:
        raise FhirServerRefused("name resolution gave no address", resolved=False)
    raise FhirServerRefused(f"address not allowed ({', '.join(refused[:3])}: private, link-local or loopback "
                            "and not listed in CDS_FHIR_PRIVATE_NETWORKS)")
