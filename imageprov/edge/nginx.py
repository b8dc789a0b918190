"""An nginx configuration for the mTLS edge: the self-hosted alternative to Mender's mtls-ambassador.

nginx terminates TLS with the edge's server certificate, requires a client
certificate that chains to the fleet CA and is not on the CRL, and passes
what it verified upstream in headers. Everything else goes to the Mender
server unchanged.

With ``accept`` (the address of ``imageprov edge serve``), the device auth
request goes to that service instead, with the verified certificate in
``X-SSL-Client-Cert``; the service preauthorizes the device and passes the
request on, so that a device with a good certificate is accepted without
anyone approving it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from imageprov.errors import UsageError

# nginx takes its configuration as text: refuse anything that could end a
# directive or open a block inside a value.
_UNSAFE = re.compile(r"[;{}\"'\s\\$#]")


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
    # The accept service (imageprov edge serve), e.g. http://127.0.0.1:9080.
    accept: str | None = None


AUTH_REQUESTS = "/api/devices/v1/authentication/auth_requests"


def _value(text: str, what: str) -> str:
    if not text or _UNSAFE.search(text):
        raise UsageError(f"{what} {text!r} holds a character nginx would misread (space, quote, ';', '$' ...)")
    return text


def _listen(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen {text!r} is not ADDR:PORT", hint="e.g. 0.0.0.0:443 or [::]:443")
    bare = host.strip("[]")
    try:
        ipaddress.ip_address(bare)
    except ValueError as exc:
        if bare != "localhost":
            raise UsageError(f"--listen {text!r}: {host!r} is not an IP address") from exc
    return text


def _upstream(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise UsageError(f"--upstream {url!r} is not an http(s) URL", hint="e.g. https://hosted.mender.io")
    return _value(url.rstrip("/"), "--upstream")


def _accept(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.netloc or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UsageError(f"--accept {url!r} is not http://ADDR:PORT", hint="e.g. http://127.0.0.1:9080")
    return _value(parts.netloc, "--accept")


# What nginx verified, for the Mender server (and the accept service) to log.
_VERIFIED = [
    "proxy_set_header X-SSL-Client-Verify $ssl_client_verify;",
    "proxy_set_header X-SSL-Client-S-DN $ssl_client_s_dn;",
    "proxy_set_header X-SSL-Client-Serial $ssl_client_serial;",
    "proxy_set_header X-SSL-Client-SHA1 $ssl_client_fingerprint;",
    "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
    "proxy_set_header X-Forwarded-Proto https;",
]


def render_nginx(config: EdgeConfig) -> str:
    """A complete nginx.conf; run it with ``nginx -p PREFIX -c FILE`` (the pid file goes under PREFIX)."""
    upstream = _upstream(config.upstream)
    files = {
        "ssl_certificate": config.server_cert,
        "ssl_certificate_key": config.server_key,
        "ssl_client_certificate": config.ca_cert,
    }
    for what, path in files.items():
        if not path.is_file():
            raise UsageError(f"{path} does not exist ({what})")
    accept_upstream = []
    if config.accept is not None:
        accept_upstream = [
            "    upstream imageprov_accept {",
            f"        server {_accept(config.accept)};",
            "        keepalive 64;  # connections to the service are reused",
            "    }",
        ]
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
        *accept_upstream,
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
        if not config.crl.is_file():
            raise UsageError(f"--crl {config.crl} does not exist")
        lines += [
            "        # Revoked devices are refused. Publish a new CRL before its nextUpdate:",
            "        # once it has passed, nginx refuses every device.",
            f"        ssl_crl {_value(str(config.crl.resolve()), '--crl')};",
        ]
    lines += ["        client_max_body_size 0;  # artifacts and logs can be large"]
    if config.accept is not None:
        lines += [
            "        # Auth requests go to imageprov edge serve, which checks them again,",
            "        # preauthorizes the device and passes them on to the Mender server.",
            f"        location = {AUTH_REQUESTS} {{",
            # No URI after the name: nginx passes the request URI on unchanged.
            "            proxy_pass http://imageprov_accept;",
            "            proxy_http_version 1.1;",
            '            proxy_set_header Connection "";',
            "            client_max_body_size 64k;",
            "            # Set here from what nginx verified, whatever the client sent.",
            "            proxy_set_header X-SSL-Client-Cert $ssl_client_escaped_cert;",
            *(f"            {line}" for line in _VERIFIED),
            "        }",
        ]
    lines += [
        "        location / {",
        f"            proxy_pass {upstream};",
        "            proxy_http_version 1.1;",
        "            proxy_set_header Connection $http_connection;",
        "            proxy_set_header Upgrade $http_upgrade;  # mender-connect websockets",
        '            proxy_set_header X-SSL-Client-Cert "";  # never from a client',
        *(f"            {line}" for line in _VERIFIED),
    ]
    if upstream.startswith("https://"):
        lines += [
            "            proxy_ssl_server_name on;",
            "            proxy_ssl_verify on;",
            f"            proxy_ssl_trusted_certificate {_value(str(config.upstream_ca), 'upstream CA')};",
        ]
    lines += ["        }", "    }", "}", ""]
    return "\n".join(lines)
