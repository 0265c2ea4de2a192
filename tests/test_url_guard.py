"""Behaviour of serve_app.url_guard, the SSRF-safe fetcher for user-supplied URLs.

All traffic stays on loopback: a small HTTP server listens on 127.0.0.2
(loopback on Linux), which the tests opt in with ``allowed_networks``; host
names are served by a fake resolver patched into the event loop.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pydantic
import pytest

from serve_app.url_guard import (
    Fetched,
    NetworkPolicy,
    UrlFetchError,
    check_address,
    fetch,
    resolve_and_check,
)

SERVER_IP = "127.0.0.2"
ALLOW_SERVER = NetworkPolicy(allowed_networks=[f"{SERVER_IP}/32"])
DEFAULT = NetworkPolicy()
BODY = b"\x89PNG fake image bytes"


# --------------------------------------------------------------------------- #
# Local test server
# --------------------------------------------------------------------------- #


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    release_slow: threading.Event  # set on the server class by the fixture

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        path = self.path.split("?", 1)[0]
        port = self.server.server_address[1]
        if path == "/ok":
            self._reply(200, BODY, content_type="image/png")
        elif path == "/host":
            self._reply(200, self.headers["Host"].encode())
        elif path == "/missing":
            self._reply(404, b"not here")
        elif path == "/big":
            self._reply(200, b"x" * 2000)
        elif path == "/big-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(20):
                self.wfile.write(b"64\r\n" + b"x" * 100 + b"\r\n")  # 0x64 = 100 bytes
            self.wfile.write(b"0\r\n\r\n")
        elif path == "/redirect-relative":
            self._redirect("/ok")
        elif path == "/redirect-to-127.0.0.1":
            self._redirect(f"http://127.0.0.1:{port}/ok")
        elif path == "/redirect-to-file":
            self._redirect("file:///etc/passwd")
        elif path.startswith("/loop/"):
            self._redirect(f"/loop/{int(path.rsplit('/', 1)[1]) + 1}")
        elif path == "/slow":
            self.release_slow.wait(5)
            self._reply(200, b"too late")
        else:
            self._reply(500, b"unknown test route")

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # the client hanging up mid-response is expected in these tests


def _serve(ssl_context: ssl.SSLContext | None = None) -> Iterator[int]:
    release = threading.Event()
    handler = type("Handler", (_Handler,), {"release_slow": release})
    server = _QuietServer((SERVER_IP, 0), handler)
    if ssl_context is not None:
        server.socket = ssl_context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    yield from _serve()


@pytest.fixture
def fake_dns(monkeypatch):
    """Install a resolver for made-up host names; returns the name -> answers dict.

    Each answer list is consumed one lookup at a time (the last one repeats),
    so a test can make a name resolve differently on the second lookup.
    IP literals still go to the real resolver (httpx/anyio looks them up).
    """
    real_getaddrinfo = asyncio.BaseEventLoop.getaddrinfo
    answers: dict[str, list[list[str]]] = {}

    async def getaddrinfo(loop, host, port, *args, **kwargs):
        try:
            ipaddress.ip_address(host)
            return await real_getaddrinfo(loop, host, port, *args, **kwargs)
        except ValueError:
            pass
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        queue = answers[host]
        ips = queue.pop(0) if len(queue) > 1 else queue[0]
        return [
            (socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
            for ip in ips
        ]

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", getaddrinfo)
    return answers


async def _fetch_error(url: str, policy: NetworkPolicy = ALLOW_SERVER, **kwargs) -> UrlFetchError:
    with pytest.raises(UrlFetchError) as info:
        await fetch(url, policy, max_bytes=kwargs.pop("max_bytes", 1000), **kwargs)
    return info.value


# --------------------------------------------------------------------------- #
# check_address: which addresses may be fetched (classification only, no traffic)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",  # loopback
        "::1",
        "10.1.2.3",  # RFC 1918 private
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata service (link-local)
        "fd00:ec2::254",  # AWS IPv6 metadata service (unique local)
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",  # unspecified: connects to this host
        "224.0.0.1",  # multicast (Python calls some multicast "global")
        "::ffff:127.0.0.1",  # IPv4-mapped IPv6 is judged by its IPv4 address
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    ],
)
def test_non_public_addresses_are_forbidden(address: str) -> None:
    ip = ipaddress.ip_address(address)
    with pytest.raises(UrlFetchError) as info:
        check_address(ip, DEFAULT)
    assert info.value.type == "url_forbidden"
    assert str(ip) in info.value.msg
    assert "operator" in info.value.msg


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address: str) -> None:
    check_address(ipaddress.ip_address(address), DEFAULT)


def test_forbidden_message_names_the_kind_of_address() -> None:
    with pytest.raises(UrlFetchError, match=r"private address \(10\.0\.0\.1\)"):
        check_address(ipaddress.ip_address("10.0.0.1"), DEFAULT)


def test_operator_can_allow_a_private_network() -> None:
    policy = NetworkPolicy(allowed_networks=["10.0.0.0/8", "fd00::/8"])
    check_address(ipaddress.ip_address("10.20.30.40"), policy)
    check_address(ipaddress.ip_address("fd00:ec2::254"), policy)
    check_address(ipaddress.ip_address("::ffff:10.0.0.1"), policy)  # mapped form too
    with pytest.raises(UrlFetchError):
        check_address(ipaddress.ip_address("192.168.0.1"), policy)  # only what was listed


def test_policy_is_immutable() -> None:
    with pytest.raises(pydantic.ValidationError):
        DEFAULT.max_redirects = 50  # type: ignore[misc]


# --------------------------------------------------------------------------- #
# resolve_and_check: DNS answers are checked in full
# --------------------------------------------------------------------------- #


async def test_ip_literals_skip_dns() -> None:
    assert await resolve_and_check("8.8.8.8", 80, DEFAULT) == [ipaddress.ip_address("8.8.8.8")]
    with pytest.raises(UrlFetchError) as info:
        await resolve_and_check("[::1]", 80, DEFAULT)
    assert info.value.type == "url_forbidden"


async def test_every_resolved_address_must_be_public(fake_dns) -> None:
    fake_dns["mixed.example"] = [["8.8.8.8", "10.0.0.1"]]
    with pytest.raises(UrlFetchError) as info:
        await resolve_and_check("mixed.example", 443, DEFAULT)
    assert info.value.type == "url_forbidden"
    assert "10.0.0.1" in info.value.msg


async def test_resolved_addresses_are_returned(fake_dns) -> None:
    fake_dns["public.example"] = [["8.8.8.8", "2606:4700::1111"]]
    assert await resolve_and_check("public.example", 443, DEFAULT) == [
        ipaddress.ip_address("8.8.8.8"),
        ipaddress.ip_address("2606:4700::1111"),
    ]


async def test_unknown_host_is_unreachable(fake_dns) -> None:
    with pytest.raises(UrlFetchError) as info:
        await resolve_and_check("nowhere.example", 443, DEFAULT)
    assert info.value.type == "url_unreachable"


async def test_localhost_is_forbidden() -> None:
    error = await _fetch_error("http://localhost/anything", DEFAULT)
    assert error.type == "url_forbidden"


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8080/",
        "http://[::ffff:127.0.0.1]/",
        # Legacy spellings of 127.0.0.1 are resolved like the OS would, then checked.
        "http://2130706433/",
        "http://0x7f.1/",
        "http://127.1/",
    ],
)
async def test_address_literals_in_urls_are_checked_before_connecting(url: str) -> None:
    error = await _fetch_error(url, DEFAULT)
    assert error.type == "url_forbidden"


# --------------------------------------------------------------------------- #
# fetch against a local server
# --------------------------------------------------------------------------- #


async def test_fetch_returns_body_and_content_type(port: int) -> None:
    result = await fetch(f"http://{SERVER_IP}:{port}/ok", ALLOW_SERVER, max_bytes=1000)
    assert result == Fetched(
        content=BODY, content_type="image/png", final_url=f"http://{SERVER_IP}:{port}/ok"
    )


async def test_same_server_is_forbidden_without_the_operator_opt_in(port: int) -> None:
    error = await _fetch_error(f"http://{SERVER_IP}:{port}/ok", DEFAULT)
    assert error.type == "url_forbidden"
    assert SERVER_IP in error.msg


async def test_http_error_status_is_reported(port: int) -> None:
    error = await _fetch_error(f"http://{SERVER_IP}:{port}/missing")
    assert error.type == "url_http_error"
    assert "404" in error.msg


@pytest.mark.parametrize("route", ["/big", "/big-chunked"])  # with / without Content-Length
async def test_body_over_the_limit_is_rejected(port: int, route: str) -> None:
    error = await _fetch_error(f"http://{SERVER_IP}:{port}{route}", max_bytes=1000)
    assert error.type == "url_too_large"
    assert "MB" in error.msg


async def test_body_at_the_limit_is_accepted(port: int) -> None:
    result = await fetch(f"http://{SERVER_IP}:{port}/big-chunked", ALLOW_SERVER, max_bytes=2000)
    assert len(result.content) == 2000


async def test_redirects_are_followed(port: int) -> None:
    result = await fetch(f"http://{SERVER_IP}:{port}/redirect-relative", ALLOW_SERVER, 1000)
    assert result.content == BODY
    assert result.final_url == f"http://{SERVER_IP}:{port}/ok"


async def test_every_redirect_hop_is_checked(port: int) -> None:
    # 127.0.0.1 is not opted in; nothing listens there on this port, so
    # url_forbidden (not url_unreachable) shows the check ran before connecting.
    error = await _fetch_error(f"http://{SERVER_IP}:{port}/redirect-to-127.0.0.1")
    assert error.type == "url_forbidden"
    assert "127.0.0.1" in error.msg


async def test_redirect_to_a_non_http_scheme_is_invalid(port: int) -> None:
    error = await _fetch_error(f"http://{SERVER_IP}:{port}/redirect-to-file")
    assert error.type == "url_invalid"


async def test_too_many_redirects(port: int) -> None:
    policy = NetworkPolicy(allowed_networks=[f"{SERVER_IP}/32"], max_redirects=2)
    error = await _fetch_error(f"http://{SERVER_IP}:{port}/loop/0", policy)
    assert error.type == "url_unreachable"
    assert "redirected more than 2 times" in error.msg


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/image.png", "gopher://x/", "not a url", ""]
)
async def test_only_http_and_https_urls_are_accepted(url: str) -> None:
    error = await _fetch_error(url)
    assert error.type == "url_invalid"


async def test_slow_server_times_out(port: int) -> None:
    policy = NetworkPolicy(allowed_networks=[f"{SERVER_IP}/32"], timeout_s=0.5)
    error = await _fetch_error(f"http://{SERVER_IP}:{port}/slow", policy)
    assert error.type == "url_timeout"


async def test_closed_port_is_unreachable() -> None:
    with socket.socket() as probe:  # grab a free port, then close it
        probe.bind((SERVER_IP, 0))
        closed_port = probe.getsockname()[1]
    error = await _fetch_error(f"http://{SERVER_IP}:{closed_port}/ok")
    assert error.type == "url_unreachable"


async def test_messages_never_contain_credentials_or_query(port: int) -> None:
    error = await _fetch_error(f"http://user:s3cret@{SERVER_IP}:{port}/missing?token=abc#frag")
    assert error.type == "url_http_error"
    assert f"http://{SERVER_IP}:{port}/missing" in error.msg
    for secret in ("user", "s3cret", "token", "abc", "frag"):
        assert secret not in error.msg


async def test_final_url_drops_credentials_but_keeps_the_query(port: int) -> None:
    result = await fetch(f"http://user:s3cret@{SERVER_IP}:{port}/ok?v=2", ALLOW_SERVER, 1000)
    assert result.final_url == f"http://{SERVER_IP}:{port}/ok?v=2"


# --------------------------------------------------------------------------- #
# Host names: connect to the checked address, talk to the original host
# --------------------------------------------------------------------------- #


async def test_hostname_is_sent_as_host_header(port: int, fake_dns) -> None:
    fake_dns["images.example"] = [[SERVER_IP]]
    result = await fetch(f"http://images.example:{port}/host", ALLOW_SERVER, 1000)
    assert result.content == f"images.example:{port}".encode()
    assert result.final_url == f"http://images.example:{port}/host"


async def test_dns_rebinding_cannot_swap_the_address(port: int, fake_dns) -> None:
    # First lookup: the allowed server. Any later lookup: 127.0.0.1 (forbidden,
    # and nothing listens there). The fetch succeeds only if the connection
    # goes to the address that was checked.
    fake_dns["rebind.example"] = [[SERVER_IP], ["127.0.0.1"]]
    result = await fetch(f"http://rebind.example:{port}/ok", ALLOW_SERVER, 1000)
    assert result.content == BODY


# --------------------------------------------------------------------------- #
# HTTPS: the certificate is verified against the host name, not the pinned IP
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def tls() -> Iterator[tuple[int, ssl.SSLContext]]:
    """An HTTPS server on 127.0.0.2 with a certificate for images.example only."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def certificate(subject, key, issuer_key, *, ca: bool, san: str | None = None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(name("test ca"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA256())

    ca_cert = certificate(name("test ca"), ca_key, ca_key, ca=True)
    leaf_cert = certificate(name("images.example"), leaf_key, ca_key, ca=False, san="images.example")

    with tempfile.TemporaryDirectory() as tmp:
        cert_path, key_path = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        with open(cert_path, "wb") as f:
            f.write(leaf_cert.public_bytes(serialization.Encoding.PEM))
        with open(key_path, "wb") as f:
            f.write(
                leaf_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_context.load_cert_chain(cert_path, key_path)

    client_context = ssl.create_default_context(
        cadata=ca_cert.public_bytes(serialization.Encoding.PEM).decode()
    )
    for tls_port in _serve(server_context):
        yield tls_port, client_context


async def test_https_certificate_is_verified_for_the_original_host(tls, fake_dns) -> None:
    tls_port, client_context = tls
    fake_dns["images.example"] = [[SERVER_IP]]
    fake_dns["other.example"] = [[SERVER_IP]]
    async with httpx.AsyncClient(verify=client_context, trust_env=False) as client:
        # The certificate names images.example and no IP, so success means the
        # check used the host name even though the connection went to 127.0.0.2.
        result = await fetch(f"https://images.example:{tls_port}/ok", ALLOW_SERVER, 1000, client)
        assert result.content == BODY
        # Same server and certificate, other name: verification fails, also when
        # the same client (and so the same connection pool) is used.
        error = await _fetch_error(f"https://other.example:{tls_port}/ok", client=client)
        assert error.type == "url_unreachable"
