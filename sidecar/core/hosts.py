"""Authorities and host patterns (pure).

`parse_authority` turns a request's `:authority` (or CONNECT target) into a lower-case host
and a port, filling the scheme's default port. `parse_host_pattern` validates a profile's
host pattern: an exact name, or one leading `*.` label, with an optional `:port`.
A `*.` pattern matches exactly one more label (`*.stripe.com` matches `api.stripe.com`,
not `stripe.com` and not `a.b.stripe.com`). This module must not import any transport,
Kubernetes or telemetry library.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["HostPattern", "overlaps", "parse_authority", "parse_host_pattern"]

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# Only the schemes Envoy's routes know: any other (`wss`) is no call mandate can place on
# the port Envoy will send it to (see `decide._request`).
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class HostPattern:
    """A compiled host pattern: ``host`` is the exact name, or the parent domain when
    ``wildcard`` is true; ``port`` is None when any port matches."""

    host: str
    wildcard: bool
    port: int | None


def _valid_hostname(host: str) -> bool:
    if not host or len(host) > 253:
        return False
    return _HOSTNAME.fullmatch(host) is not None


def _split_port(text: str) -> tuple[str, str | None]:
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            raise ValueError("unterminated '[' in IPv6 address")
        host, rest = text[: end + 1], text[end + 1 :]
        if rest == "":
            return host, None
        if not rest.startswith(":"):
            raise ValueError("unexpected text after IPv6 address")
        return host, rest[1:]
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, port
    if ":" in text:
        raise ValueError("IPv6 addresses must be written in brackets, e.g. [::1]:8080")
    return text, None


def _parse_port(port: str) -> int:
    # isascii: str.isdigit() and int() also accept other scripts' digits ('٤٤٣' -> 443).
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"port {port!r} is not a number from 1 to 65535")
    return int(port)


def _canonical_host(host: str) -> str:
    """Lower-case, drop one trailing dot, check the name or IP literal; raise ValueError."""
    # isascii first: str.lower() folds some non-ASCII letters into ASCII ('\u212a', the
    # Kelvin sign, becomes 'k'), so a look-alike name would be decided as another host.
    if not host.isascii():
        raise ValueError(f"{host!r} is not a valid host name (host names are ASCII)")
    host = host.lower()
    if host.startswith("["):
        try:
            return "[" + str(ipaddress.IPv6Address(host[1:-1])) + "]"
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    if host.endswith("."):
        host = host[:-1]
    if not _valid_hostname(host):
        raise ValueError(f"{host!r} is not a valid host name")
    return host


@lru_cache(
    maxsize=4096
)  # a pod calls few hosts; bounded, so a caller inventing hosts costs nothing
def parse_authority(authority: str, scheme: str) -> tuple[str, int] | None:
    """Host (lower case, no trailing dot) and port of a request, or None if malformed."""
    try:
        host, port = _split_port(authority.strip())
        host = _canonical_host(host)
        if port is None:
            default = _DEFAULT_PORTS.get(scheme.lower())
            if default is None:
                return None
            return host, default
        return host, _parse_port(port)
    except ValueError:
        return None


def parse_host_pattern(text: str) -> HostPattern:
    """Validate a profile host pattern; raise ValueError saying what is expected."""
    if not isinstance(text, str) or not text:
        raise ValueError("a host pattern must be a non-empty string")
    host, port_text = _split_port(text)
    port = None if port_text is None else _parse_port(port_text)
    wildcard = False
    if host.startswith("*."):
        wildcard = True
        host = host[2:]
    if "*" in host:
        raise ValueError(
            f"host pattern {text!r}: only one leading '*.' label is allowed (e.g. '*.example.com')"
        )
    try:
        host = _canonical_host(host)
    except ValueError as exc:
        raise ValueError(f"host pattern {text!r}: {exc}") from None
    if wildcard and host.startswith("["):
        raise ValueError(f"host pattern {text!r}: an IP address cannot have a wildcard label")
    return HostPattern(host=host, wildcard=wildcard, port=port)


def overlaps(a: HostPattern, b: HostPattern) -> bool:
    """Whether some host:port matches both patterns (a port on only one side matches). A
    `*.` label stands for exactly one label, as in rule matching."""
    if a.port is not None and b.port is not None and a.port != b.port:
        return False
    if a.wildcard == b.wildcard:
        return a.host == b.host
    exact, parent = (a.host, b.host) if b.wildcard else (b.host, a.host)
    return exact.partition(".")[2] == parent
