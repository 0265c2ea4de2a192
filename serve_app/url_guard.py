"""SSRF-safe fetching of user-supplied HTTP(S) URLs.

Every URL a user hands us (input images, LoRA weights, ...) is fetched from
inside the cluster, where it could otherwise reach the cloud metadata service
(169.254.169.254), Redis, the Ray dashboard or anything else on a private
network. This module is the single gate for such fetches:

* only ``http``/``https`` URLs are accepted;
* the host is resolved once, and *every* resolved address must be a public
  (globally routable) address unless the operator opted a network in;
* the connection goes to the address that was checked, not to a second DNS
  lookup, so DNS rebinding cannot swap the address between check and connect;
* redirects are followed by hand and every hop goes through the same checks;
* the body is streamed and cut off at a size limit, and the whole fetch runs
  under one deadline.

TLS verification with a pinned address
--------------------------------------
The request URL's host is rewritten to the checked IP, so httpcore's pool
connects there; the original hostname travels in the ``Host`` header and in
the ``sni_hostname`` request extension. In httpx 0.28 / httpcore 1.0,
``AsyncHTTPConnection._connect`` passes ``server_hostname=sni_hostname`` to
``start_tls``, which anyio hands to ``SSLContext.wrap_bio``. With httpx's
default context (``check_hostname=True``, ``CERT_REQUIRED``) that one value
is used both for SNI and for certificate hostname verification, so the
certificate is still checked against the hostname the user wrote
(tests/test_url_guard.py checks this with a locally issued certificate).

Two limits of that mechanism:

* httpcore's *proxy* tunnel ignores ``sni_hostname`` and verifies against the
  IP (and a proxy would do its own DNS), so the client we create uses
  ``trust_env=False``: no ``HTTP(S)_PROXY`` from the environment. A
  caller-supplied ``client`` must not use a proxy either.
* httpcore pools connections by (scheme, IP, port), not by SNI name. A pooled
  TLS connection verified for ``a.example`` could be reused for ``b.example``
  on the same IP without checking b's certificate. Pinned https requests
  therefore send ``Connection: close`` so they never leave a connection in
  the pool. (An idle connection that *other* code left in a shared client's
  pool for that IP origin could still be picked up; that cannot widen SSRF,
  the address was checked either way.)
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import ipaddress
import socket
from dataclasses import dataclass
from typing import BinaryIO

import httpx
import pydantic

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# RFC 6052 well-known NAT64 prefix: 64:ff9b::a.b.c.d is translated to a.b.c.d by
# a NAT64 gateway, so the embedded IPv4 address is what the request really hits.
_NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}


class NetworkPolicy(pydantic.BaseModel):
    """What a fetch of a user-supplied URL may reach; set by the operator."""

    model_config = pydantic.ConfigDict(frozen=True)

    # Networks that are allowed although not public (e.g. an in-cluster MinIO).
    allowed_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    max_redirects: int = 5
    # Deadline for the whole fetch: DNS, every redirect hop and the body.
    timeout_s: float = 20.0
    user_agent: str = "diffusion-serve"


class UrlFetchError(Exception):
    """A user-supplied URL could not be fetched; ``msg`` is meant for the API user.

    ``type`` is a short machine-readable reason: ``url_invalid``,
    ``url_forbidden``, ``url_unreachable``, ``url_timeout``,
    ``url_http_error`` or ``url_too_large``.
    """

    def __init__(self, msg: str, type: str) -> None:
        super().__init__(msg)
        self.msg = msg
        self.type = type


@dataclass(frozen=True)
class Fetched:
    """A fetched body; ``final_url`` is the URL after redirects, without credentials."""

    content: bytes
    content_type: str | None
    final_url: str


def check_address(ip: IPAddress, policy: NetworkPolicy, *, subject: str = "The URL") -> None:
    """Raise ``url_forbidden`` unless ``ip`` is public or in ``policy.allowed_networks``.

    IPv6 addresses that embed an IPv4 destination (IPv4-mapped ``::ffff:a.b.c.d``,
    NAT64 ``64:ff9b::a.b.c.d``, 6to4 ``2002:aabb:ccdd::``) are judged by that
    IPv4 address too, because that is where the packets end up; Python's
    ``is_global`` calls some of them global. ``subject`` starts the message.
    """
    targets = _effective_addresses(ip)
    if any(t in net for t in (ip, *targets) for net in policy.allowed_networks):
        return
    for target in targets:
        kind = _non_public_kind(target)
        if kind is not None:
            shown = str(ip) if target == ip else f"{ip}, which reaches {target}"
            raise UrlFetchError(
                f"{subject} points at a {kind} address ({shown}); only public internet "
                "addresses are allowed unless the operator allows this network. "
                "Use a publicly reachable URL.",
                "url_forbidden",
            )


async def resolve_and_check(
    host: str, port: int, policy: NetworkPolicy, *, subject: str | None = None
) -> list[IPAddress]:
    """Resolve ``host`` and check every address; return them in resolver order.

    All addresses must pass, not just the first: the OS or httpx could pick
    any of them. IP literals (``[::1]`` included) skip DNS.
    """
    subject = subject or f"The host {host}"
    literal = _parse_ip_literal(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except (socket.gaierror, UnicodeError) as exc:
            raise UrlFetchError(
                f"{subject} could not be resolved (DNS lookup failed: {exc}). "
                "Check the host name in the URL.",
                "url_unreachable",
            ) from None
        addresses = []
        for family, _, _, _, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if ip not in addresses:
                addresses.append(ip)
        if not addresses:
            raise UrlFetchError(
                f"{subject} has no IP address. Check the host name in the URL.",
                "url_unreachable",
            )
    for ip in addresses:
        check_address(ip, policy, subject=subject)
    return addresses


@dataclass(frozen=True)
class FetchInfo:
    """What `fetch_into` learned while streaming: type, final URL, size and sha256 of the body."""

    content_type: str | None
    final_url: str
    size: int
    sha256: str


async def fetch(
    url: str,
    policy: NetworkPolicy,
    max_bytes: int,
    client: httpx.AsyncClient | None = None,
) -> Fetched:
    """GET ``url`` under ``policy`` and return at most ``max_bytes`` of (decoded) body.

    Raises ``UrlFetchError`` for every failure; its message never contains
    the URL's credentials, query string or fragment.
    """
    sink = io.BytesIO()
    info = await fetch_into(url, policy, max_bytes, sink, client=client)
    return Fetched(content=sink.getvalue(), content_type=info.content_type, final_url=info.final_url)


async def fetch_into(
    url: str,
    policy: NetworkPolicy,
    max_bytes: int,
    sink: BinaryIO,
    client: httpx.AsyncClient | None = None,
    timeout_s: float | None = None,
) -> FetchInfo:
    """Like `fetch`, but stream the body into ``sink`` (a file for multi-GB weights).

    ``timeout_s`` (default ``policy.timeout_s``) bounds the whole transfer. On failure the sink may
    hold a partial body: callers write to a temporary file and discard it.
    """
    shown = _redact_str(url)
    limit = policy.timeout_s if timeout_s is None else timeout_s
    try:
        return await asyncio.wait_for(_fetch(url, policy, max_bytes, sink, client), timeout=limit)
    except asyncio.TimeoutError:
        raise UrlFetchError(
            f"Fetching {shown} took longer than {limit:g} s. Make sure the "
            "URL responds quickly, or host the file somewhere faster.",
            "url_timeout",
        ) from None


async def check_url(url: str, policy: NetworkPolicy, *, subject: str = "The URL") -> httpx.URL:
    """Parse ``url`` and check where it resolves to now (for URLs we call later, like webhooks;
    the call itself checks again, as the address may change)."""
    parsed = _parse_url(url)
    await resolve_and_check(
        parsed.raw_host.decode("ascii"), parsed.port or _DEFAULT_PORTS[parsed.scheme], policy, subject=f"{subject} {_redact(parsed)}"
    )
    return parsed


async def post(
    url: str, content: bytes, headers: dict[str, str], policy: NetworkPolicy, timeout_s: float, client: httpx.AsyncClient | None = None
) -> int:
    """POST ``content`` to ``url`` once, under the same checks as a fetch, and return the status
    code. Redirects are not followed (a 3xx is the answer); at most 64 KiB of the reply is read.
    Raises ``UrlFetchError`` when the address is forbidden or the call fails or times out."""
    parsed = _parse_url(url)
    shown = _redact(parsed)

    async def send(client: httpx.AsyncClient) -> int:
        addresses = await resolve_and_check(
            parsed.raw_host.decode("ascii"), parsed.port or _DEFAULT_PORTS[parsed.scheme], policy, subject=f"The URL {shown}"
        )
        kwargs = _pinned_request(parsed, addresses[0], policy)
        request = client.build_request("POST", content=content, **{**kwargs, "headers": {**kwargs["headers"], **headers}})
        response = await client.send(request, stream=True, follow_redirects=False)
        try:
            read = 0
            async for chunk in response.aiter_raw():
                read += len(chunk)
                if read > 64 * 1024:
                    break
            return response.status_code
        finally:
            await response.aclose()

    async def with_client() -> int:
        if client is not None:
            return await send(client)
        async with _new_client(policy) as own:
            return await send(own)

    try:
        return await asyncio.wait_for(with_client(), timeout=timeout_s)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise UrlFetchError(f"{shown} did not answer within {timeout_s:g} s", "url_timeout") from None
    except httpx.RequestError as exc:
        raise UrlFetchError(f"could not reach {shown} ({type(exc).__name__})", "url_unreachable") from None


async def _fetch(
    url: str, policy: NetworkPolicy, max_bytes: int, sink: BinaryIO, client: httpx.AsyncClient | None
) -> FetchInfo:
    if client is not None:
        return await _follow_redirects(url, policy, max_bytes, sink, client)
    async with _new_client(policy) as own_client:
        return await _follow_redirects(url, policy, max_bytes, sink, own_client)


async def _follow_redirects(
    url: str, policy: NetworkPolicy, max_bytes: int, sink: BinaryIO, client: httpx.AsyncClient
) -> FetchInfo:
    """Fetch hop by hop, resolving and checking the host of every hop."""
    current = _parse_url(url)
    for _hop in range(policy.max_redirects + 1):
        shown = _redact(current)
        port = current.port or _DEFAULT_PORTS[current.scheme]
        addresses = await resolve_and_check(
            current.raw_host.decode("ascii"), port, policy, subject=f"The URL {shown}"
        )
        try:
            outcome = await _send_once(
                client, _pinned_request(current, addresses[0], policy), current, max_bytes, sink
            )
        except httpx.TimeoutException:
            raise UrlFetchError(
                f"Fetching {shown} timed out. Make sure the URL responds quickly, "
                "or host the file somewhere faster.",
                "url_timeout",
            ) from None
        except httpx.RequestError as exc:
            raise UrlFetchError(
                f"Could not fetch {shown} ({type(exc).__name__}). Make sure the URL is "
                "publicly reachable over HTTP(S) with a valid certificate.",
                "url_unreachable",
            ) from None
        if isinstance(outcome, FetchInfo):
            return outcome
        current = outcome
    raise UrlFetchError(
        f"Fetching {_redact_str(url)} was redirected more than {policy.max_redirects} "
        "times. Use the final URL directly.",
        "url_unreachable",
    )


async def _send_once(
    client: httpx.AsyncClient, request_kwargs: dict, url: httpx.URL, max_bytes: int, sink: BinaryIO
) -> FetchInfo | httpx.URL:
    """Send one request; return the body, or the next URL if this was a redirect."""
    shown = _redact(url)
    request = client.build_request("GET", **request_kwargs)
    response = await client.send(request, stream=True, follow_redirects=False)
    try:
        if response.status_code in _REDIRECT_STATUSES and "location" in response.headers:
            try:
                return _parse_url(url.join(response.headers["location"]), redirected=True)
            except httpx.InvalidURL:
                raise UrlFetchError(
                    f"{shown} redirected to an invalid URL. Use a URL that serves the "
                    "file directly.",
                    "url_invalid",
                ) from None
        if not response.is_success:
            raise UrlFetchError(
                f"Fetching {shown} failed with HTTP status {response.status_code}. "
                "Check that the URL is correct and publicly readable.",
                "url_http_error",
            )
        too_large = UrlFetchError(
            f"The file at {shown} is larger than the {_format_size(max_bytes)} limit. "
            "Use a smaller file.",
            "url_too_large",
        )
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise too_large
        size = 0
        digest = hashlib.sha256()
        # aiter_bytes counts *decoded* bytes, so a gzip bomb is cut off too.
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise too_large
            digest.update(chunk)
            sink.write(chunk)
        return FetchInfo(
            content_type=response.headers.get("content-type"),
            final_url=str(url.copy_with(userinfo=b"")),
            size=size,
            sha256=digest.hexdigest(),
        )
    finally:
        await response.aclose()


def _pinned_request(url: httpx.URL, ip: IPAddress, policy: NetworkPolicy) -> dict:
    """Request arguments that connect to ``ip`` but still speak to ``url``'s host.

    ``Host`` carries the original host:port for virtual hosting, and for https
    ``sni_hostname`` makes httpcore send SNI and verify the certificate for the
    original host name (see the module docstring). Such a connection is closed
    after the response: the pool keys it by IP, so reusing it for another
    host name on that IP would skip that name's certificate check.
    """
    host = url.raw_host.decode("ascii")
    headers = {"Host": url.netloc.decode("ascii"), "User-Agent": policy.user_agent}
    extensions = {}
    if url.scheme == "https" and _parse_ip_literal(host) is None:
        extensions["sni_hostname"] = host
        headers["Connection"] = "close"
    return {
        "url": url.copy_with(host=str(ip)),
        "headers": headers,
        "extensions": extensions,
        "timeout": policy.timeout_s,
    }


def _new_client(policy: NetworkPolicy) -> httpx.AsyncClient:
    # trust_env=False: an environment proxy would resolve the host itself and
    # httpcore's proxy tunnel ignores sni_hostname.
    return httpx.AsyncClient(
        follow_redirects=False, trust_env=False, timeout=policy.timeout_s
    )


def _parse_url(url: str | httpx.URL, *, redirected: bool = False) -> httpx.URL:
    """Parse and validate a URL: http(s) with a host, else ``url_invalid``."""
    where = "redirected to" if redirected else "got"
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        raise UrlFetchError(
            "The URL is not valid. Send an absolute http:// or https:// URL.",
            "url_invalid",
        ) from None
    if parsed.scheme not in _DEFAULT_PORTS:
        scheme = parsed.scheme or "no scheme"
        raise UrlFetchError(
            f"Only http:// and https:// URLs can be fetched, {where} {scheme}. "
            "Send an http(s) URL or upload the file.",
            "url_invalid",
        )
    if not parsed.raw_host:
        raise UrlFetchError(
            f"The URL {_redact(parsed)} has no host. Send an absolute http(s) URL.",
            "url_invalid",
        )
    return parsed


def _parse_ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _effective_addresses(ip: IPAddress) -> list[IPAddress]:
    """The addresses a packet to ``ip`` really reaches (see ``check_address``)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return [ip.ipv4_mapped]
        if ip in _NAT64_PREFIX:
            return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
        if ip.sixtofour is not None:
            return [ip, ip.sixtofour]
    return [ip]


def _non_public_kind(ip: IPAddress) -> str | None:
    """None for a public unicast address, else a word for the message."""
    if ip.is_global and not ip.is_multicast and not ip.is_reserved:
        return None
    for kind in ("loopback", "link-local", "multicast", "unspecified", "private", "reserved"):
        if getattr(ip, f"is_{kind.replace('-', '_')}"):
            return kind
    return "non-public"


def _redact(url: httpx.URL) -> str:
    """scheme://host[:port]/path, without credentials, query or fragment."""
    try:
        return str(url.copy_with(userinfo=b"", query=None, fragment=None))
    except httpx.InvalidURL:  # pragma: no cover - defensive
        return "the URL"


def redact_url(url: str) -> str:
    """A URL fit for logs and messages: no credentials, query or fragment."""
    return _redact_str(url)


def _redact_str(url: str) -> str:
    try:
        return _redact(httpx.URL(url))
    except (httpx.InvalidURL, TypeError):
        return "the URL"


def _format_size(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1_000_000:g} MB"
    return f"{n / 1_000_000:.3g} MB ({n} bytes)"
