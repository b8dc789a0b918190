"""An nginx configuration for the mTLS edge: the self-hosted alternative to Mender's mtls-ambassador.

nginx terminates TLS with the edge's server certificate, requires a client
certificate that chains to the fleet CA and is not on the CRL, and passes
what it verified upstream in headers. Only the device API (``/api/devices/``)
and the prefixes named with ``routes`` reach the Mender server; every other
path (the UI, the management API) is 404 at the edge.

With ``accept`` (the address of ``imageprov edge serve``), the device auth
request goes to that service instead, with the verified certificate in
``X-SSL-Client-Cert``; the service preauthorizes the device and passes the
request on, so that a device with a good certificate is accepted without
anyone approving it. Every other proxied request is first put to the
service's ``CHECK`` (nginx's ``auth_request``), so that a revoked
certificate is cut off on its next request, without reloading nginx.

The Mender server's name is resolved when a request needs it (``resolver``,
from /etc/resolv.conf or ``resolvers``), so that nginx starts while DNS is not
up yet and follows a server that moves. An address (or ``resolve_at_start``)
goes in an upstream block instead, whose connections are kept alive: nginx
1.22, Debian's, keeps no pool for a name it resolves per request. With
``health_listen`` a plain-HTTP port answers edge serve's probes, and nothing
else, for a load balancer that has no client certificate. With ``est``, the
three EST routes of RFC 7030 (``cacerts``, ``simpleenroll``,
``simplereenroll``) go to edge serve --est, with the verified certificate, and
without the route check: the service checks a bootstrap certificate there
itself, and the route check refuses one everywhere else.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

from cryptography import x509

from imageprov.errors import UsageError
from imageprov.pki.config import mask_password

AUTH_REQUESTS = "/api/devices/v1/authentication/auth_requests"
# Where nginx asks the accept service whether a request may pass: 204 allows, 401 or 403
# refuse, anything else (503: it cannot decide now) makes nginx answer 503 itself.
CHECK = "/_imageprov/check"
DEVICES = "/api/devices/"
# A deployment's check for an update (v1 GET, v2 POST), and where edge serve serves artifacts.
NEXT_V1 = "/api/devices/v1/deployments/device/deployments/next"
NEXT_V2 = "/api/devices/v2/deployments/device/deployments/next"
ARTIFACTS = "/imageprov/artifacts/"
# mender-connect's remote terminal, file transfer and port forwarding: one websocket.
DEVICECONNECT = "/api/devices/v1/deviceconnect/connect"
# Enrollment over Secure Transport (RFC 7030, 3.2.2): the fleet CA, a first certificate for a bootstrap
# certificate, a renewal. No CA label: the edge has one CA.
EST = "/.well-known/est/"
EST_CACERTS = EST + "cacerts"
EST_SIMPLEENROLL = EST + "simpleenroll"
EST_SIMPLEREENROLL = EST + "simplereenroll"
# The largest body an EST request has: a CSR of an RSA-4096 key is under 2 KiB in base64.
EST_BODY_LIMIT = "16k"

# nginx takes its configuration as text: refuse anything that could end a
# directive or open a block inside a value.
_UNSAFE = re.compile(r"[;{}\"'\s\\$#]")
# A location prefix: segments of plain characters. nginx matches locations against the
# decoded, normalized URI, so '%', '.' and '..' segments or '//' would never match anything.
_ROUTE = re.compile(r"/(?:[A-Za-z0-9_~-][A-Za-z0-9._~-]*/?)*")
_SOCKET_PATH = re.compile(r"/[A-Za-z0-9._/+-]*")
# sun_path holds 108 bytes with its terminating NUL; nginx refuses a longer path.
_SOCKET_PATH_MAX = 107
_UNAVAILABLE = "@imageprov_unavailable"
# Where an https Mender server's certificate is verified by default: Debian's bundle.
SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
RESOLV_CONF = Path("/etc/resolv.conf")
# What the health listener answers: edge serve's readiness and liveness, and nothing else.
HEALTH_ROUTES = ("/healthz", "/livez")
# The upstream block of a Mender server resolved at start, and the variable that names one
# resolved per request.
_MENDER = "imageprov_mender"
# Idle connections to the Mender server each worker keeps. nginx closes them after
# _KEEPALIVE_IDLE, before the server or a load balancer in front of it (often 60 s) would:
# a POST sent on a connection the server is closing fails with 502, it is not retried.
_KEEPALIVE = 32
_KEEPALIVE_IDLE = "30s"
# The longest Retry-After given: an hour, as edge serve takes it.
MAX_RETRY_AFTER = 3600


@dataclass(frozen=True)
class EdgeConfig:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    upstream: str
    listen: str = "0.0.0.0:443"
    crl: Path | None = None
    # The CA of an https upstream: an on-premises Mender's private CA; None: Debian's bundle (hosted Mender).
    upstream_ca: Path | None = None
    # The accept service (imageprov edge serve): unix:/run/imageprov/edge.sock or http://127.0.0.1:9080.
    accept: str | None = None
    # Path prefixes passed to the Mender server besides /api/devices/, e.g. /api/management/v1/useradm/.
    routes: tuple[str, ...] = ()
    # Seconds a device waits before it retries when the check cannot decide (edge serve's default).
    retry_after: int = 5
    # DNS servers (ADDR or ADDR:PORT) nginx asks for the Mender server's name; () reads resolv_conf.
    resolvers: tuple[str, ...] = ()
    resolv_conf: Path = RESOLV_CONF
    # Resolve the Mender server's name once, when nginx starts or reloads, as nginx does without a
    # resolver: then its connections are kept alive, but nginx -t fails while DNS is down.
    resolve_at_start: bool = False
    # ADDR:PORT of a plain-HTTP listener that answers edge serve's /healthz and /livez (needs accept).
    health_listen: str | None = None
    # Send deployments/next and artifact downloads to edge serve (edge serve --artifact-host; needs accept).
    artifacts: bool = False
    # Send EST's cacerts, simpleenroll and simplereenroll to edge serve (edge serve --est; needs accept).
    est: bool = False


def _value(text: str, what: str) -> str:
    if not text or _UNSAFE.search(text):
        raise UsageError(f"{what} {text!r} holds a character nginx would misread (space, quote, ';', '$' ...)")
    return text


def _listen(text: str, option: str = "--listen", example: str = "0.0.0.0:443 or [::]:443") -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{option} {masked(text)!r} is not ADDR:PORT", hint=f"e.g. {example}")
    bare = host.strip("[]")
    try:
        ipaddress.ip_address(bare)
    except ValueError as exc:
        if bare != "localhost":
            raise UsageError(f"{option} {masked(text)!r}: {masked(host)!r} is not an IP address") from exc
    return text


def _resolver(text: str) -> str:
    """A DNS server as nginx's ``resolver`` takes it: ``ADDR``, ``ADDR:PORT``, ``[V6]`` or ``[V6]:PORT``."""
    example = "--resolver 10.0.0.2 or --resolver [fd00::53]:53"
    if text.startswith("["):
        address, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise UsageError(f"--resolver {text!r} is not [IPV6] or [IPV6]:PORT", hint=f"e.g. {example}")
        port = rest[1:] if rest else None
    elif text.count(":") > 1:  # an IPv6 address without a port
        address, port = text, None
    else:
        address, sep, after = text.partition(":")
        port = after if sep else None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        # A name would itself need resolving, once, at start: what the resolver is there to avoid.
        raise UsageError(f"--resolver {text!r} is not an IP address [and :PORT]", hint=f"e.g. {example}") from None
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise UsageError(f"--resolver {text!r}: {port!r} is not a port", hint=f"e.g. {example}")
    shown = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"{shown}:{port}" if port is not None else shown


def system_resolvers(path: Path = RESOLV_CONF) -> list[str]:
    """The ``nameserver`` addresses of ``path`` (resolv.conf), as nginx's ``resolver`` takes them.

    A scoped IPv6 address (``fe80::1%eth0``) is left out: nginx cannot name the interface."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise UsageError(
            f"cannot read {path} for the DNS servers: {exc.strerror}", hint="pass --resolver ADDR"
        ) from exc
    found: list[str] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver" and "%" not in words[1]:
            with contextlib.suppress(UsageError):  # glibc, too, skips a line it cannot read
                found.append(_resolver(words[1]))
    return found


def masked(url: str) -> str:
    """``url`` with what follows the user name in its userinfo (a password, or a token) replaced by ``***``,
    and any ``password=`` (a query's, or libpq's ``key=value``) too.

    Works on text urlsplit refuses, so that no message ever shows a secret."""
    url = mask_password(url)
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority = rest[:end]
    if "@" not in authority:
        return url
    userinfo, _, hostport = authority.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    # Without a colon, the user part itself may be the secret (a token as user name).
    shown = f"{user}:***" if colon else "***"
    return f"{scheme}{sep}{shown}@{hostport}{rest[end:]}"


def check_crl(path: Path) -> None:
    """``path`` holds a PEM CRL, as nginx's ssl_crl takes it: nginx would not start, or not reload, on anything else."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read --crl {path}: {exc.strerror}") from exc
    try:
        x509.load_pem_x509_crl(data)
    except ValueError:
        raise UsageError(
            f"--crl {path} is not a PEM CRL", hint="write one with 'imageprov crl --pki PKI --out FILE' (PEM)"
        ) from None


def split_url(url: str, option: str, example: str) -> SplitResult:
    """``urlsplit``, its ValueError (an unclosed ``[``, a bad port) turned into one line that shows no secret."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a port that is not a number
    except ValueError:
        # Neither the exception's text nor its traceback: for "http://u:p[w]@host" it quotes part of
        # the password.
        raise UsageError(f"{option} {masked(url)} is not a valid URL", hint=f"e.g. {example}") from None
    if masked(url) != url:
        raise UsageError(
            f"{option} {masked(url)}: a user or password does not belong in this URL",
            hint="the edge needs none; edge serve reads the Mender credentials from --password-file or --token-file",
        )
    return parts


def check_ca_bundle(path: Path) -> None:
    """``--upstream-ca`` holds at least one certificate a TLS client can trust."""
    try:
        context = ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--upstream-ca {path} is not a PEM certificate bundle: {exc}") from exc
    if not context.get_ca_certs():
        raise UsageError(f"--upstream-ca {path} holds no CA certificate")


def parse_upstream(url: str) -> str:
    """The Mender server's URL as the edge (nginx and the service alike) takes it: scheme and host, no path."""
    example = "https://hosted.mender.io"
    parts = split_url(url, "--upstream", example)
    plain = parts.scheme in ("http", "https") and parts.hostname and not (parts.query or parts.fragment)
    if not plain:
        raise UsageError(f"--upstream {masked(url)} is not an http(s) URL", hint=f"e.g. {example}")
    # A path would replace each location's prefix in proxy_pass: /api/devices/x would reach PATHx.
    if parts.path not in ("", "/"):
        raise UsageError(f"--upstream {masked(url)!r} has a path: the Mender server is at the root of its host")
    return _value(f"{parts.scheme}://{parts.netloc}", "--upstream")


@dataclass(frozen=True)
class _Mender:
    """The Mender server as the locations that pass requests to it name it."""

    url: str  # scheme://netloc, as parse_upstream gives it
    host: str  # a name, or an address (an IPv6 one without brackets)
    port: int
    resolved_at_start: bool

    @property
    def https(self) -> bool:
        return self.url.startswith("https://")

    @property
    def netloc(self) -> str:
        """What the Host header says: the server's name (and port) as the URL gives them."""
        return self.url.partition("://")[2]

    @property
    def proxy_pass(self) -> str:
        # A variable makes nginx resolve the name at request time, with the resolver.
        return f"{self.url.partition('://')[0]}://{_MENDER}" if self.resolved_at_start else f"${_MENDER}"

    @property
    def ssl_name(self) -> str:
        # In brackets, an IPv6 address is not cut at its first ':' as a port would be.
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def server(self) -> str:
        """The upstream block's ``server``."""
        return f"{self.ssl_name}:{self.port}"


def _mender(url: str, resolve_at_start: bool) -> _Mender:
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
        address = True
    except ValueError:
        address = False
    # localhost is in /etc/hosts, which nginx's resolver never reads, and does not move.
    at_start = address or host == "localhost" or resolve_at_start
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return _Mender(url, host, port, at_start)


def _accept(text: str) -> str:
    """The ``server`` of the accept service's upstream block: ``unix:/PATH`` or ``HOST:PORT``."""
    example = "unix:/run/imageprov/edge.sock or http://127.0.0.1:9080"
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not _SOCKET_PATH.fullmatch(path):
            raise UsageError(
                f"--accept {text!r}: the socket path must be absolute, of letters, digits and . _ - + /",
                hint="e.g. unix:/run/imageprov/edge.sock",
            )
        if len(path.encode()) > _SOCKET_PATH_MAX:
            raise UsageError(f"--accept {text!r}: a Unix socket path is at most {_SOCKET_PATH_MAX} bytes")
        return text
    parts = split_url(text, "--accept", example)
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UsageError(f"--accept {masked(text)} is not unix:/PATH or http://ADDR:PORT", hint=f"e.g. {example}")
    return _value(parts.netloc, "--accept")


def _routes(routes: Sequence[str]) -> list[str]:
    checked: list[str] = []
    for route in routes:
        if not _ROUTE.fullmatch(route):
            raise UsageError(
                f"--route {route!r} is not a path prefix nginx can match",
                hint="a path that starts with '/', of letters, digits and . _ ~ -, e.g. /api/management/v1/useradm/",
            )
        if route == "/":
            raise UsageError("--route / would pass every path, the UI's too", hint="name the API prefixes you need")
        if route.startswith(DEVICES):
            raise UsageError(f"--route {route!r}: {DEVICES} is always passed")
        if route.startswith(CHECK.rsplit("/", 1)[0]):
            raise UsageError(f"--route {route!r}: the edge uses this prefix itself")
        if route not in checked:
            checked.append(route)
    return checked


# What nginx verified, for the Mender server (and the accept service) to log; and where the
# device reached the edge: Mender builds links for the device (presigned artifact links, the
# configure add-on) from X-Forwarded-Host and -Proto, the Host header as the device sent it
# (with its port) and https. Set here whatever the client sent.
_VERIFIED = [
    "proxy_set_header X-SSL-Client-Verify $ssl_client_verify;",
    "proxy_set_header X-SSL-Client-S-DN $ssl_client_s_dn;",
    "proxy_set_header X-SSL-Client-Serial $ssl_client_serial;",
    "proxy_set_header X-SSL-Client-SHA1 $ssl_client_fingerprint;",
    "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
    "proxy_set_header X-Forwarded-Host $http_host;",
    "proxy_set_header X-Forwarded-Proto https;",
]


def _indent(lines: Sequence[str], depth: int) -> list[str]:
    return [" " * (4 * depth) + line for line in lines]


def _location(match: str, body: Sequence[str]) -> list[str]:
    return _indent([f"location {match} {{", *_indent(body, 1), "}"], 2)


def _to_upstream(mender: _Mender, upstream_ca: Path, *, guarded: bool, connection: str = '""') -> list[str]:
    """A location's directives that pass it to the Mender server.

    ``connection``: the Connection header sent; empty (none) lets the connection go back to the pool."""
    # Every proxy_set_header is written in each location: one set there hides all of the server's.
    lines = [] if mender.resolved_at_start else [f'set ${_MENDER} "{mender.url}";']
    lines += [
        # No URI after the host: the request URI goes on unchanged.
        f"proxy_pass {mender.proxy_pass};",
        "proxy_http_version 1.1;",
        # The server's own name, not the upstream block's: Mender routes on it.
        f"proxy_set_header Host {mender.netloc};",
        f"proxy_set_header Connection {connection};",
        'proxy_set_header X-SSL-Client-Cert "";  # never from a client',
        *_VERIFIED,
    ]
    if mender.https:
        lines += [
            "proxy_ssl_server_name on;",
            # SNI and the name checked on the certificate: the server's, not the upstream block's
            # (nginx sends no SNI for an address, and checks the certificate's DNS names only).
            f"proxy_ssl_name {mender.ssl_name};",
            "proxy_ssl_verify on;",
            # A private CA may sign through intermediates: nginx's default depth (1) allows one.
            "proxy_ssl_verify_depth 4;",
            f"proxy_ssl_trusted_certificate {_value(str(upstream_ca), 'upstream CA')};",
        ]
    if guarded:
        lines += [
            f"auth_request {CHECK};",
            # nginx answers 500 when the check gives anything but 2xx, 401 or 403 (or no answer).
            f"error_page 500 = {_UNAVAILABLE};",
        ]
    return lines


def _to_service(*, artifacts: bool) -> list[str]:
    """A device route that edge serve answers itself, after the route check."""
    lines = [
        "proxy_pass http://imageprov_accept;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_set_header X-SSL-Client-Cert $ssl_client_escaped_cert;",
        *_VERIFIED,
        f"auth_request {CHECK};",
        f"error_page 500 = {_UNAVAILABLE};",
    ]
    if artifacts:
        lines += [
            "# Streamed as it comes, not spooled to nginx's temporary files; a device's Range passes on.",
            "proxy_buffering off;",
            "# With the cache, a download waits until storage has sent the whole artifact to the edge.",
            "proxy_read_timeout 1h;",
        ]
    return lines


def render_nginx(config: EdgeConfig) -> str:
    """A complete nginx.conf; run it with ``nginx -p PREFIX -c FILE`` (the pid file goes under PREFIX)."""
    upstream = parse_upstream(config.upstream)
    routes = _routes(config.routes)
    if not 0 <= config.retry_after <= MAX_RETRY_AFTER:  # as edge serve takes it
        raise UsageError(f"--retry-after {config.retry_after} is not 0 to {MAX_RETRY_AFTER} s")
    files = {
        "ssl_certificate": config.server_cert,
        "ssl_certificate_key": config.server_key,
        "ssl_client_certificate": config.ca_cert,
    }
    for what, path in files.items():
        if not path.is_file():
            raise UsageError(f"{path} does not exist ({what})")
    accept = _accept(config.accept) if config.accept is not None else None
    guarded = accept is not None
    mender = _mender(upstream, config.resolve_at_start)
    upstream_ca = _upstream_ca(config, mender)
    resolvers = _resolvers(config, mender)
    health = _health_listen(config, accept)
    if config.artifacts and accept is None:
        raise UsageError("--artifacts sends downloads to edge serve, and there is no --accept",
                         hint="pass --accept with the address edge serve listens on")  # fmt: skip
    if config.est and accept is None:
        raise UsageError("--est sends enrollments to edge serve, and there is no --accept",
                         hint="pass --accept with the address edge serve --est listens on")  # fmt: skip
    lines = [
        "# mTLS edge for Mender devices, written by imageprov edge nginx.",
        "# Devices must present a client certificate signed by the fleet CA;",
        "# a verified device is passed to the Mender server with its certificate's",
        "# subject, serial and fingerprint in X-SSL-Client-* headers.",
        "worker_processes auto;",
        "error_log stderr warn;",
        "pid nginx.pid;",
        # A fleet switched on at once: each proxied request holds two connections.
        "worker_rlimit_nofile 16384;",
        "events { worker_connections 8192; }",
        "http {",
        "    access_log off;",
        "    # A websocket asks to upgrade its connection; any other request to the socket sends",
        "    # no Connection header, so that its connection to the Mender server is kept alive.",
        "    map $http_upgrade $imageprov_connection {",
        "        default upgrade;",
        '        "" "";',
        "    }",
    ]
    if resolvers:
        lines += [
            "    # The Mender server's name is resolved when a request needs it, by these servers, each",
            "    # answer kept for its TTL: nginx -t and nginx start while DNS is down, and a server that",
            "    # moves is followed without a reload. nginx reads neither /etc/hosts nor resolv.conf's",
            "    # search domains: the name must be a full one.",
            f"    resolver {' '.join(resolvers)};",
            "    resolver_timeout 10s;",
        ]
    if mender.resolved_at_start:
        lines += [
            f"    upstream {_MENDER} {{",
            f"        server {_value(mender.server, '--upstream')};  # resolved when nginx starts or reloads",
            "        # Each worker keeps idle connections to the Mender server: no TCP and TLS handshake",
            "        # per request.",
            f"        keepalive {_KEEPALIVE};",
            f"        keepalive_timeout {_KEEPALIVE_IDLE};",
            "    }",
        ]
    else:
        lines += [
            "    # nginx 1.22 keeps no connections alive to a name it resolves per request (an upstream's",
            "    # 'resolve' needs nginx 1.27.3): each request to the Mender server opens its own.",
            "    # imageprov edge nginx --resolve-at-start trades this for a pool.",
        ]
    if accept is not None:
        lines += [
            "    upstream imageprov_accept {",
            # The worker processes connect: a Unix socket must be writable by nginx's worker user.
            f"        server {accept};",
            "        keepalive 64;  # connections to the service are reused",
            "    }",
        ]
    lines += [
        "    server {",
        # A deep accept queue: a fleet switching on at once must not see SYN retries.
        f"        listen {_listen(config.listen)} ssl backlog=4096;",
        "        server_name _;",
        "        ssl_protocols TLSv1.2 TLSv1.3;",
        # Named as given, links kept: a Kubernetes Secret's files are links into a dated directory that a
        # rotation replaces, and nginx -s reload must then read the new one.
        *(f"        {what} {_value(str(path.absolute()), what)};" for what, path in files.items()),
        "        ssl_verify_client on;",
        "        # Device certificates are signed by the fleet CA itself.",
        "        ssl_verify_depth 1;",
    ]
    if config.crl is not None:
        check_crl(config.crl)
        lines += [
            "        # Revoked devices are refused. Publish a new CRL before its nextUpdate:",
            "        # once it has passed, nginx refuses every device. nginx reads this file",
            "        # only when it starts or reloads (nginx -s reload): a revocation published",
            "        # since then is not seen here.",
            f"        ssl_crl {_value(str(config.crl.absolute()), '--crl')};",
        ]
    lines += [
        "        client_max_body_size 0;  # artifacts and logs can be large",
        "        # Only the device API reaches the Mender server: not its UI, not its management",
        "        # API. Without this location nginx would serve files from its prefix.",
        *_location("/", ["return 404;"]),
        *_location(DEVICES, _to_upstream(mender, upstream_ca, guarded=guarded)),
        *_location(
            f"= {DEVICECONNECT}",
            [
                *_to_upstream(mender, upstream_ca, guarded=guarded, connection="$imageprov_connection"),
                "proxy_set_header Upgrade $http_upgrade;",
                "# A terminal may sit idle: nginx would close the socket after 60 s without a frame.",
                "proxy_read_timeout 1h;",
                "proxy_send_timeout 1h;",
            ],
        ),
    ]
    for route in routes:
        lines += _location(route, _to_upstream(mender, upstream_ca, guarded=guarded))
    if accept is not None and config.artifacts:
        lines += [
            "        # A deployment's artifact link is rewritten by edge serve to point here, and the",
            "        # download served by it (from storage, or its cache): both after the route check.",
        ]
        for match in (f"= {NEXT_V1}", f"= {NEXT_V2}", f"^~ {ARTIFACTS}"):
            lines += _location(match, _to_service(artifacts=match.endswith(ARTIFACTS)))
    if accept is not None and config.est:
        lines += [
            "        # Enrollment (EST, RFC 7030) with a bootstrap certificate, and renewal: edge serve --est",
            "        # checks the certificate itself (the route check refuses a bootstrap certificate), so",
            "        # these three paths, and no other under /.well-known/, go to it without that check.",
        ]
        for est_path in (EST_CACERTS, EST_SIMPLEENROLL, EST_SIMPLEREENROLL):
            lines += _location(
                f"= {est_path}",
                [
                    "proxy_pass http://imageprov_accept;",
                    "proxy_http_version 1.1;",
                    'proxy_set_header Connection "";',
                    f"client_max_body_size {EST_BODY_LIMIT};",
                    "# Set here from what nginx verified, whatever the client sent.",
                    "proxy_set_header X-SSL-Client-Cert $ssl_client_escaped_cert;",
                    *_VERIFIED,
                ],
            )
    if accept is not None:
        lines += [
            "        # Auth requests go to imageprov edge serve, which checks them again,",
            "        # preauthorizes the device and passes them on to the Mender server.",
            *_location(
                f"= {AUTH_REQUESTS}",
                [
                    # No URI after the name: nginx passes the request URI on unchanged.
                    "proxy_pass http://imageprov_accept;",
                    "proxy_http_version 1.1;",
                    'proxy_set_header Connection "";',
                    "client_max_body_size 64k;",
                    "# Set here from what nginx verified, whatever the client sent.",
                    "proxy_set_header X-SSL-Client-Cert $ssl_client_escaped_cert;",
                    *_VERIFIED,
                ],
            ),
            "        # Every other request asks the service first (auth_request). ssl_crl is read only",
            "        # when nginx starts or reloads; the service sees every revocation at once, so a",
            "        # revoked device is cut off on its next request, on every route.",
            *_location(
                f"= {CHECK}",
                [
                    "internal;  # a client asking for it gets 404",
                    f"proxy_pass http://imageprov_accept{CHECK};",
                    "proxy_http_version 1.1;",
                    'proxy_set_header Connection "";',
                    "proxy_pass_request_body off;",
                    'proxy_set_header Content-Length "";',
                    "proxy_set_header X-SSL-Client-Cert $ssl_client_escaped_cert;",
                    "proxy_set_header X-Original-URI $request_uri;",
                    "proxy_set_header X-Original-Method $request_method;",
                    *_VERIFIED,
                ],
            ),
            "        # The check could not decide: refuse, and tell the device when to retry.",
            *_location(
                _UNAVAILABLE,
                [
                    "default_type application/json;",
                    f"add_header Retry-After {config.retry_after} always;",
                    """return 503 '{"error": "the edge cannot check the device certificate now"}';""",
                ],
            ),
        ]
    lines += ["    }"]
    if health is not None:
        lines += [
            "    # Probes for a load balancer or Kubernetes: plain HTTP on a port of its own, no client",
            "    # certificate, and only edge serve's probes: /healthz (ready: the registry and the Mender",
            "    # server answer; 503 otherwise, 502 while the service is down) and /livez (alive). No",
            "    # device or management route is reachable here.",
            "    server {",
            f"        listen {health};",
            "        server_name _;",
            *_location("/", ["return 404;"]),
        ]
        for route in HEALTH_ROUTES:
            lines += _location(
                f"= {route}",
                [
                    "limit_except GET { deny all; }  # and HEAD",
                    "proxy_pass http://imageprov_accept;",
                    "proxy_http_version 1.1;",
                    'proxy_set_header Connection "";',
                    "proxy_pass_request_body off;",
                    'proxy_set_header Content-Length "";',
                    'proxy_set_header X-SSL-Client-Cert "";  # no certificate on this port, and never a client\'s',
                ],
            )
        lines += ["    }"]
    lines += ["}", ""]
    return "\n".join(lines)


def _upstream_ca(config: EdgeConfig, mender: _Mender) -> Path:
    if config.upstream_ca is None:
        return SYSTEM_CA_BUNDLE
    if not mender.https:
        raise UsageError(
            f"--upstream-ca is for an https Mender server, and --upstream is {mender.url}",
            hint="drop --upstream-ca, or name the server https://...",
        )
    check_ca_bundle(config.upstream_ca)
    return config.upstream_ca.absolute()


def _resolvers(config: EdgeConfig, mender: _Mender) -> list[str]:
    """The DNS servers of the ``resolver`` directive; none for a server resolved at start."""
    if config.resolve_at_start and config.resolvers:
        raise UsageError(
            "--resolver names the DNS servers nginx asks at request time, --resolve-at-start resolves once: "
            "give one of them"
        )
    resolvers = [_resolver(text) for text in config.resolvers]
    if resolvers or mender.resolved_at_start:
        return resolvers
    found = system_resolvers(config.resolv_conf)
    if not found:
        raise UsageError(
            f"{config.resolv_conf} names no DNS server nginx can ask for {mender.host}",
            hint="pass --resolver ADDR (e.g. your network's DNS server), or --resolve-at-start",
        )
    return found


def _health_listen(config: EdgeConfig, accept: str | None) -> str | None:
    if config.health_listen is None:
        return None
    health = _listen(config.health_listen, "--health-listen", "127.0.0.1:8081 or 0.0.0.0:8081")
    if accept is None:
        raise UsageError(
            "--health-listen reports edge serve's readiness, and there is no --accept",
            hint="pass --accept with the address edge serve listens on",
        )
    if health.rpartition(":")[2] == config.listen.rpartition(":")[2]:
        raise UsageError(
            f"--health-listen {health} and --listen {config.listen} share a port: the health port is plain HTTP",
            hint="e.g. --health-listen 0.0.0.0:8081",
        )
    return health
