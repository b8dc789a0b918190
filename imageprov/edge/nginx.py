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
"""

from __future__ import annotations

import ipaddress
import re
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
# mender-connect's remote terminal, file transfer and port forwarding: one websocket.
DEVICECONNECT = "/api/devices/v1/deviceconnect/connect"

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
    # The CA of an https upstream (hosted Mender); Debian's bundle by default.
    upstream_ca: Path = Path("/etc/ssl/certs/ca-certificates.crt")
    # The accept service (imageprov edge serve): unix:/run/imageprov/edge.sock or http://127.0.0.1:9080.
    accept: str | None = None
    # Path prefixes passed to the Mender server besides /api/devices/, e.g. /api/management/v1/useradm/.
    routes: tuple[str, ...] = ()
    # Seconds a device waits before it retries when the check cannot decide (edge serve's default).
    retry_after: int = 5


def _value(text: str, what: str) -> str:
    if not text or _UNSAFE.search(text):
        raise UsageError(f"{what} {text!r} holds a character nginx would misread (space, quote, ';', '$' ...)")
    return text


def _listen(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen {masked(text)!r} is not ADDR:PORT", hint="e.g. 0.0.0.0:443 or [::]:443")
    bare = host.strip("[]")
    try:
        ipaddress.ip_address(bare)
    except ValueError as exc:
        if bare != "localhost":
            raise UsageError(f"--listen {masked(text)!r}: {masked(host)!r} is not an IP address") from exc
    return text


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


# What nginx verified, for the Mender server (and the accept service) to log.
_VERIFIED = [
    "proxy_set_header X-SSL-Client-Verify $ssl_client_verify;",
    "proxy_set_header X-SSL-Client-S-DN $ssl_client_s_dn;",
    "proxy_set_header X-SSL-Client-Serial $ssl_client_serial;",
    "proxy_set_header X-SSL-Client-SHA1 $ssl_client_fingerprint;",
    "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
    "proxy_set_header X-Forwarded-Proto https;",
]


def _indent(lines: Sequence[str], depth: int) -> list[str]:
    return [" " * (4 * depth) + line for line in lines]


def _location(match: str, body: Sequence[str]) -> list[str]:
    return _indent([f"location {match} {{", *_indent(body, 1), "}"], 2)


def _to_upstream(upstream: str, upstream_ca: Path, *, guarded: bool) -> list[str]:
    """A location's directives that pass it to the Mender server."""
    # Every proxy_set_header is written in each location: one set there hides all of the server's.
    lines = [
        f"proxy_pass {upstream};",  # no URI after the host: the request URI goes on unchanged
        "proxy_http_version 1.1;",
        'proxy_set_header X-SSL-Client-Cert "";  # never from a client',
        *_VERIFIED,
    ]
    if upstream.startswith("https://"):
        lines += [
            "proxy_ssl_server_name on;",
            "proxy_ssl_verify on;",
            f"proxy_ssl_trusted_certificate {_value(str(upstream_ca), 'upstream CA')};",
        ]
    if guarded:
        lines += [
            f"auth_request {CHECK};",
            # nginx answers 500 when the check gives anything but 2xx, 401 or 403 (or no answer).
            f"error_page 500 = {_UNAVAILABLE};",
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
        "    # A websocket asks to upgrade its connection; other requests to the socket close it.",
        "    map $http_upgrade $imageprov_connection {",
        "        default upgrade;",
        '        "" close;',
        "    }",
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
        *(f"        {what} {_value(str(path.resolve()), what)};" for what, path in files.items()),
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
            f"        ssl_crl {_value(str(config.crl.resolve()), '--crl')};",
        ]
    lines += [
        "        client_max_body_size 0;  # artifacts and logs can be large",
        "        # Only the device API reaches the Mender server: not its UI, not its management",
        "        # API. Without this location nginx would serve files from its prefix.",
        *_location("/", ["return 404;"]),
        *_location(DEVICES, _to_upstream(upstream, config.upstream_ca, guarded=guarded)),
        *_location(
            f"= {DEVICECONNECT}",
            [
                *_to_upstream(upstream, config.upstream_ca, guarded=guarded),
                "proxy_set_header Upgrade $http_upgrade;",
                "proxy_set_header Connection $imageprov_connection;",
                "# A terminal may sit idle: nginx would close the socket after 60 s without a frame.",
                "proxy_read_timeout 1h;",
                "proxy_send_timeout 1h;",
            ],
        ),
    ]
    for route in routes:
        lines += _location(route, _to_upstream(upstream, config.upstream_ca, guarded=guarded))
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
    lines += ["    }", "}", ""]
    return "\n".join(lines)
