"""Who may see the station's screen and stop the line: its own machine alone, or whoever holds the token.

A loopback dashboard (the default) is open to the station's own browser, but
not to the web pages that browser opens: it answers only requests addressed
to a loopback name (DNS rebinding: ``evil.example`` resolving to 127.0.0.1
would make the dashboard that site's own), and every POST carries the page's
own CSRF token and, when the browser names its origin, comes from the
dashboard itself.

Any other address serves the line's network, and is treated as hostile: every
request needs the token of ``--dashboard-token-file`` (a secret in a file,
never in argv, a URL or a log), as ``Authorization: Bearer TOKEN`` (a
Prometheus scraper, a script) or as the cookie that the page's sign-in form
sets (a screen). The cookie holds an HMAC of the token, not the token, so
that a new token in the file ends every session. Every comparison takes
constant time.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from imageprov.errors import UsageError
from imageprov.pki.secret_file import read_secret_file

DEFAULT_HOST = "127.0.0.1"
# A token an attacker on the line's network cannot guess: 16 characters of `openssl rand -hex 16` are 64 bits.
MIN_TOKEN = 16
COOKIE = "imageprov_dashboard"
TOKEN_HINT = "e.g. openssl rand -hex 16 > dashboard.token; chmod 600 dashboard.token"


@dataclass(frozen=True)
class Address:
    """Where the dashboard listens."""

    host: str
    port: int  # 0: any free port, chosen when it starts listening

    @property
    def loopback(self) -> bool:
        return _loopback(self.host)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """``HOST:PORT``, ``[IPV6]:PORT`` or a bare ``PORT`` (on 127.0.0.1); HOST an IP address or localhost."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = DEFAULT_HOST, text
    bare = host.removeprefix("[").removesuffix("]")
    if not port.isdigit() or int(port) > 65535 or not bare or (":" in bare and not host.startswith("[")):
        raise UsageError(f"--dashboard {text!r} is not [HOST:]PORT", hint="e.g. --dashboard 127.0.0.1:8080")
    if bare != "localhost":
        try:
            ipaddress.ip_address(bare)
        except ValueError:
            raise UsageError(
                f"--dashboard {text!r}: {bare!r} is not an IP address",
                hint="the address of one of this machine's interfaces, e.g. 0.0.0.0:8080 for all of them",
            ) from None
    return Address(bare, int(port))


def read_token(path: Path) -> str:
    """The token in ``path``: one line of at least ``MIN_TOKEN`` characters."""
    token = read_secret_file(path, "--dashboard-token-file").strip()
    if len(token) < MIN_TOKEN or not token.isprintable():
        raise UsageError(
            f"--dashboard-token-file {path} must hold one line of at least {MIN_TOKEN} characters",
            hint=TOKEN_HINT,
        )
    return token


class Verdict(enum.Enum):
    ALLOW = "allow"
    SIGN_IN = "sign in"  # 401: no token, or a wrong one
    WRONG_HOST = "wrong host"  # 403: a loopback dashboard asked for under another name
    FORGED = "forged"  # 403: a POST that another page made the browser send


@dataclass(frozen=True)
class Access:
    """The decisions of one dashboard: its token (if any), and the CSRF token of its pages."""

    loopback: bool  # the listener's address
    token: str | None = field(default=None, repr=False)
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)

    @property
    def session(self) -> str:
        """The cookie's value: proof of the token that is not the token."""
        assert self.token is not None
        return hmac.new(self.token.encode(), b"imageprov dashboard session", hashlib.sha256).hexdigest()

    def request(self, *, host: str | None, authorization: str | None, cookie: str | None) -> Verdict:
        """May this request read the dashboard (any route but the sign-in form)?"""
        if self.loopback and not _loopback(_hostname(host or "")):
            return Verdict.WRONG_HOST
        if self.token is None or self.bearer(authorization):
            return Verdict.ALLOW
        if cookie is not None and _same(cookie, self.session):
            return Verdict.ALLOW
        return Verdict.SIGN_IN

    def post(self, *, host: str | None, origin: str | None, csrf: str | None, authorization: str | None) -> Verdict:
        """May this POST, already allowed by ``request``, act? Only a page of the dashboard's own, or a script.

        A script proves itself with its bearer token, which no browser adds on its own.
        """
        if not self.same_origin(host=host, origin=origin):
            return Verdict.FORGED
        if self.bearer(authorization) or (csrf is not None and _same(csrf, self.csrf)):
            return Verdict.ALLOW
        return Verdict.FORGED

    @staticmethod
    def same_origin(*, host: str | None, origin: str | None) -> bool:
        """Whether a request that names its origin (browsers do, on a POST) comes from a page of this host."""
        return origin is None or origin in (f"http://{host}", f"https://{host}")  # https: behind a TLS proxy

    def bearer(self, authorization: str | None) -> bool:
        scheme, _, credentials = (authorization or "").partition(" ")
        return self.token is not None and scheme.lower() == "bearer" and _same(credentials.strip(), self.token)

    def sign_in(self, submitted: str) -> bool:
        return self.token is not None and _same(submitted.strip(), self.token)


def _same(given: str, expected: str) -> bool:
    # Bytes: compare_digest refuses str with characters beyond ASCII, which a request may well send.
    return hmac.compare_digest(given.encode(), expected.encode())


def _hostname(host: str) -> str:
    """The name in a Host header, without its port."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
