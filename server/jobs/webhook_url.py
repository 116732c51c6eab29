"""Webhook targets: URL validation and the address policy that keeps callbacks off internal networks.

`parse_webhook_url` does every check that needs no DNS (scheme, host syntax, userinfo, literal
addresses); `check_addresses` runs at delivery time on what the host resolved to. Both refuse an
address that is loopback, private, link-local (cloud metadata included), multicast, reserved,
unspecified, shared (CGNAT) or otherwise not globally routable, also when it hides inside an
IPv6 form (IPv4-mapped, 6to4, Teredo), unless the operator allow-listed it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from tokenrelay_engines.base import InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

FIELD = "webhook.url"
MAX_URL_LENGTH = 2048
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # RFC 6598 carrier-grade NAT
_DEFAULT_PORTS = {"https": 443, "http": 80}


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """A validated webhook URL, split into what the connection needs."""

    scheme: str  # "https" or "http"
    host: str  # ASCII (IDNA), lower case, no brackets, no trailing dot
    port: int
    request_target: str  # path and query, as sent on the request line
    literal_ip: IPAddress | None  # set when the URL names an address rather than a host

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if self.literal_ip is not None and self.literal_ip.version == 6 else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class AllowList:
    """The operator's exceptions: host names (exact, or "*.suffix") and address networks."""

    hosts: tuple[str, ...] = ()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: tuple[str, ...]) -> AllowList:
        """Raises ValueError naming the entry that is neither a host name, an address nor a CIDR."""
        hosts: list[str] = []
        networks: list[IPNetwork] = []
        for raw in entries:
            entry = raw.strip().lower().rstrip(".")
            if entry.startswith("[") and entry.endswith("]"):
                entry = entry[1:-1]
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            name = entry[2:] if entry.startswith("*.") else entry
            if not _valid_hostname(name):
                raise ValueError(f"webhook allow-list entry {raw!r} is not a host name, address or CIDR")
            hosts.append(entry)
        return cls(tuple(hosts), tuple(networks))

    def allows_host(self, host: str) -> bool:
        for entry in self.hosts:
            if entry == host or (entry.startswith("*.") and host.endswith(entry[1:])):
                return True
        return False

    def allows_address(self, address: IPAddress) -> bool:
        return any(address.version == net.version and address in net for net in self.networks)

    def allows_loopback(self) -> bool:
        return any(net.overlaps(_loopback_of(net.version)) for net in self.networks)


def _loopback_of(version: int) -> IPNetwork:
    return ipaddress.ip_network("127.0.0.0/8" if version == 4 else "::1/128")


def _valid_hostname(name: str) -> bool:
    if not name or len(name) > 253:
        return False
    return all(_LABEL.match(label) for label in name.split("."))


def forbidden_reason(address: IPAddress) -> str | None:
    """Why `address` must not receive a webhook, or None when it is a public unicast address."""
    if address.version == 6 and address.ipv4_mapped is not None:
        inner = forbidden_reason(address.ipv4_mapped)  # the connection reaches exactly this IPv4 address
        return None if inner is None else f"maps to {address.ipv4_mapped}, which {inner}"
    if address.version == 6:
        embedded = address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None:
            inner = forbidden_reason(embedded)
            if inner is not None:
                return f"embeds {embedded}, which {inner}"
    if address.is_unspecified:
        return "is unspecified"
    if address.is_loopback:
        return "is loopback"
    if address.is_link_local:
        return "is link-local (includes cloud metadata endpoints)"
    if address.is_multicast:
        return "is multicast"
    if address.version == 4 and address in _SHARED:
        return "is shared address space (CGNAT 100.64.0.0/10)"
    if address.is_private:
        return "is private"
    if address.is_reserved:
        return "is reserved"
    if not address.is_global:
        return "is not globally routable"
    return None


def _never_allowed(address: IPAddress) -> bool:
    """Addresses no allow-list opens: they are never a real endpoint."""
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.version == 4 and address == ipaddress.IPv4Address("255.255.255.255"):
        return True
    return address.is_unspecified or address.is_multicast


def check_address(host: str, address: IPAddress, allow: AllowList) -> str | None:
    """None when `host` may be reached at `address`, else the refusal as a sentence."""
    reason = forbidden_reason(address)
    if reason is None:
        return None
    if _never_allowed(address):
        return f"{address} {reason} (never a valid webhook target)"
    if allow.allows_host(host) or allow.allows_address(address):
        return None
    return f"{address} {reason} and is not allow-listed"


def check_addresses(host: str, addresses: list[IPAddress], allow: AllowList) -> str | None:
    """A host is refused when ANY address it resolved to is refused (the client may pick any)."""
    if not addresses:
        return f"{host} resolved to no address"
    for address in addresses:
        refusal = check_address(host, address, allow)
        if refusal is not None:
            return refusal if str(address) == host else f"{host} resolves to {refusal}"
    return None


def _parse_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def parse_webhook_url(url: object, *, allow_http: bool, allow: AllowList) -> WebhookTarget:
    """Every check that needs no DNS. Raises InvalidRequest("webhook.url", ...)."""

    def refuse(message: str) -> InvalidRequest:
        return InvalidRequest(FIELD, message)

    if not isinstance(url, str) or not url:
        raise refuse("must be a non-empty string")
    if len(url) > MAX_URL_LENGTH:
        raise refuse(f"must be at most {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise refuse("must not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise refuse(f"is not a valid URL ({exc})") from None
    try:
        port = parts.port
    except ValueError:
        raise refuse("port must be a number in 1..65535") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise refuse(f"scheme must be https{' or http' if allow_http else ''}, not {parts.scheme or 'missing'!r}")
    if scheme == "http" and not allow_http:
        raise refuse("must use https (plain http is not enabled on this server)")
    if "@" in parts.netloc:
        raise refuse("must not contain credentials (user:password@)")
    raw_host = parts.hostname or ""
    if not raw_host:
        raise refuse("must name a host")
    if port is not None and not 1 <= port <= 65535:
        raise refuse("port must be in 1..65535")
    if "%" in raw_host:
        raise refuse("host must not contain percent-encoding or an IPv6 zone")
    literal = _parse_literal(raw_host)
    if literal is None and parts.netloc.startswith("["):
        raise refuse(f"{raw_host!r} is not a valid IPv6 address")
    if literal is not None:
        host = str(literal)
    else:
        try:
            host = raw_host.rstrip(".").encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise refuse(f"host {raw_host!r} is not a valid host name") from None
        if not _valid_hostname(host):
            raise refuse(f"host {raw_host!r} is not a valid host name")
        if _NUMERIC_LABEL.match(host.rsplit(".", 1)[-1]):
            # "2130706433", "0x7f.1", "127.1": resolvers read these as addresses; refuse the ambiguity
            raise refuse(f"host {raw_host!r} is a non-canonical numeric address")
        if (host == "localhost" or host.endswith(".localhost")) and not (
            allow.allows_host(host) or allow.allows_loopback()
        ):
            raise refuse(f"{host} is loopback and is not allow-listed")
    if literal is not None:
        refusal = check_address(host, literal, allow)
        if refusal is not None:
            raise refuse(refusal)
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    query = quote(parts.query, safe="/?%:@!$&'()*+,;=-._~")
    return WebhookTarget(
        scheme=scheme,
        host=host,
        port=port if port is not None else _DEFAULT_PORTS[scheme],
        request_target=f"{path}?{query}" if query else path,
        literal_ip=literal,
    )
