"""Where the edge learns that a certificate is revoked besides the registry: a CRL or a denylist.

One small interface, ``RevocationSource``, so that the service asks the same
question of each (``await source.revoked(serial)``) and a new backend (a
source is one more class. Files are reread when they change, so a new CRL or
denylist takes effect without a restart. The registry is not one of them: it
says more than "revoked" (pending, unknown, the identity pin), and
``standing.RegistryGate`` asks it.

Fail closed: a file that is removed, damaged or replaced by one that is not
good (a CRL of another key, an older CRL) makes ``revoked`` raise, with the
reason, on every request until a good one is back; the contents read before are
never served in its place.

A reload holds up the event loop, and with it every other request, for a couple
of milliseconds at most. A file up to ``INLINE_SIZE`` is read on the spot by the
lookup that finds it changed (that takes less than handing it over would), so
it is in force from that lookup on. A bigger one is read in a worker process (a
CRL of 100,000 takes a quarter of a second to parse and verify, and
cryptography holds the GIL throughout, so a thread would not do), and a thread
of the source waits for it and builds the set. One reload at a time; while it
runs, every lookup, the one that found the change too, is answered from what is
in force: the previous file (within its nextUpdate) or the previous failure.
What the reload read replaces that, for every lookup, the moment it is done.

So a revocation counts once its file is read; a file gone bad refuses from the
moment a reload finds it bad, and nothing read before it is served again until
a reload reads a good one (one is tried when the file changes, and every
``RETRY_INTERVAL`` meanwhile); a missing file refuses at once (each lookup
looks at the file before anything else).
"""

from __future__ import annotations

import abc
import atexit
import base64
import binascii
import concurrent.futures
import copy
import datetime as dt
import itertools
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple, Protocol, TypeVar, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from imageprov.errors import ImageprovError, PkiError, UsageError
from imageprov.pki import crl_der
from imageprov.pki.chain import crl_problem

T = TypeVar("T")

# A reload still running after this long has failed (a read stuck on a dead network filesystem): the worker
# is killed and the source refuses, rather than go on answering from the previous file without bound.
RELOAD_DEADLINE = 30.0
# A file found bad is read again when it changes, or this long after: a failure that was not the file's (a
# read error, the worker killed) passes, and a bad CRL of 100,000 costs one parse a second, not one a lookup.
RETRY_INTERVAL = 1.0
# A file this small is read on the spot, on the event loop, as it always was: a CRL of 64 KiB (1,200
# serials) parses and verifies in 2 ms, less than handing it to the worker would take, and no lookup is
# answered from the file before it once it is seen to have changed.
INLINE_SIZE = 64 * 1024
# Rereading a file is background work: on a busy machine the requests come first. At this niceness the worker
# still gets a tenth of a core against each busy process: a CRL of 100,000 in a few seconds, within the deadline.
WORKER_NICENESS = 10
# Serials handed back from the worker in pieces of this many: turning one into a set holds the GIL for about
# a millisecond, and the event loop gets it back between two.
_PIECE = 4096


class RevocationSource(Protocol):
    """Says whether a certificate (by lowercase hex serial) is revoked; raises ``PkiError`` if it cannot tell."""

    name: str

    async def revoked(self, serial: str) -> bool: ...

    async def revoked_serials(self) -> frozenset[str]:
        """Every serial the source revokes now (a changed file read anew): what the edge cuts off in Mender."""
        ...


class _Stamp(NamedTuple):
    """Which file, and whether anything wrote to it."""

    dev: int
    ino: int  # a file renamed into place may have the same size and (coarse) mtime
    size: int
    mtime_ns: int
    ctime_ns: int


@dataclass(frozen=True)
class _Loaded:
    stamp: _Stamp
    serials: frozenset[str]
    next_update: dt.datetime | None = None
    last_update: dt.datetime | None = None
    number: int | None = None


@dataclass(frozen=True)
class _Failed:
    """A reload found the file bad: every lookup raises ``error`` until a reload reads a good one."""

    error: ImageprovError
    stamp: _Stamp  # of the file the reload was started for
    at: float  # time.monotonic() when it failed


@dataclass(frozen=True)
class _CrlFacts:
    """What the worker process hands back of a CRL it read and verified."""

    pieces: tuple[bytes, ...]  # the revoked serials, in hex, one a line
    next_update: dt.datetime | None
    last_update: dt.datetime
    number: int | None


def normalize_serial(text: str) -> str:
    """``0A:1b`` / ``0x0a1b`` / ``a1b`` -> ``a1b``, the way the registry writes serials."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    int(cleaned, 16)  # ValueError on anything that is not hex
    return cleaned.lstrip("0") or "0"


def _stamp(path: Path) -> _Stamp:
    try:
        info = os.stat(path)
    except OSError as exc:
        raise PkiError(f"cannot read {path}: {exc.strerror}") from exc
    return _Stamp(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:  # replaced or removed between the stat and the read
        raise PkiError(f"cannot read {path}: {exc.strerror}") from exc


def _pieces(serials: Iterable[str]) -> tuple[bytes, ...]:
    # Bytes, not a set of strings: unpickling 100,000 strings in one call would hold the GIL for tens of ms.
    rest, pieces = iter(serials), []
    while piece := list(itertools.islice(rest, _PIECE)):
        pieces.append("\n".join(piece).encode("ascii"))
    return tuple(pieces)


def _serial_set(pieces: tuple[bytes, ...]) -> frozenset[str]:
    def serials() -> Iterator[str]:
        for piece in pieces:
            yield from piece.decode("ascii").split("\n")
            # In the source's thread: hand the GIL to the event loop's thread, if it waits for it, between two
            # pieces, rather than at the interpreter's switch interval (5 ms).
            time.sleep(0)

    return frozenset(serials())


def _read_crl(path: Path, ca_der: bytes) -> _CrlFacts:
    """Read, parse and verify the CRL at ``path``: in the worker process (in the service's own at start-up)."""
    data = _read(path)
    try:
        der = _der_of_pem(data) if data.lstrip().startswith(b"-----") else data
        crl = x509.load_der_x509_crl(der)
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = None
    except (ValueError, x509.DuplicateExtension) as exc:
        raise PkiError(f"{path} is not a CRL") from exc
    ca_cert = x509.load_der_x509_certificate(ca_der)
    if crl.issuer != ca_cert.subject or not _signed_by(crl, der, ca_cert):
        raise PkiError(f"{path} is not signed by the fleet CA")
    critical = [e.oid.dotted_string for e in crl.extensions if e.critical]
    if critical:  # a delta CRL or one that covers only some certificates: what is missing could be revoked
        raise PkiError(f"{path} has a critical extension the edge does not process ({', '.join(critical)})")
    serials = _pieces(f"{entry.serial_number:x}" for entry in crl)
    return _CrlFacts(serials, crl.next_update_utc, crl.last_update_utc, number)


_PEM_BEGIN, _PEM_END = b"-----BEGIN X509 CRL-----", b"-----END X509 CRL-----"
_ECDSA = {x509.SignatureAlgorithmOID.ECDSA_WITH_SHA256, x509.SignatureAlgorithmOID.ECDSA_WITH_SHA384,
          x509.SignatureAlgorithmOID.ECDSA_WITH_SHA512}  # fmt: skip


def _der_of_pem(data: bytes) -> bytes:
    """The DER inside a PEM CRL: read here so that the bytes parsed are the bytes whose signature is checked."""
    start, end = data.find(_PEM_BEGIN), data.find(_PEM_END)
    if start < 0 or end < start:
        raise ValueError("no PEM CRL")
    try:
        return base64.b64decode(b"".join(data[start + len(_PEM_BEGIN) : end].split()), validate=True)
    except binascii.Error as exc:
        raise ValueError("not base64") from exc


def _signed_by(crl: x509.CertificateRevocationList, der: bytes, ca_cert: x509.Certificate) -> bool:
    """Whether the CA signed ``crl`` (parsed from ``der``), checked over the bytes as they are.

    The fleet CA's key is an EC key: its signature is checked over the CRL's own TBSCertList bytes, a hash of
    5 MB for 100,000 entries; cryptography's ``is_signature_valid`` encodes the list again first (0.2 s of the
    edge's CPU at every reload). Any other key or algorithm is left to cryptography."""
    key, hashed = ca_cert.public_key(), crl.signature_hash_algorithm
    if not isinstance(key, ec.EllipticCurvePublicKey) or crl.signature_algorithm_oid not in _ECDSA or hashed is None:
        return crl.is_signature_valid(key)  # type: ignore[arg-type]
    try:
        tbs, signature = crl_der.signed_parts(der)
        key.verify(signature, tbs, ec.ECDSA(hashed))
    except (PkiError, InvalidSignature):
        return False
    return True


def _read_denylist(path: Path) -> tuple[bytes, ...]:
    """Read the denylist at ``path``: in the worker process (in the service's own at start-up)."""
    serials = set()
    for number, line in enumerate(_read(path).decode("utf-8", "replace").splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            serials.add(normalize_serial(text))
        except ValueError as exc:
            raise UsageError(f"{path}:{number}: {text!r} is not a hex serial") from exc
    return _pieces(serials)


_HEADER = struct.Struct(">Q")  # the length of each message between the service and its worker process
_WORKER_MAIN = "from imageprov.edge.revocation import _serve; _serve()"


def _receive(stream: IO[bytes]) -> bytes:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    (size,) = _HEADER.unpack(header)
    message = stream.read(size)
    if len(message) < size:
        raise EOFError
    return message


def _serve() -> None:
    """The worker process: runs each request from stdin and answers on stdout, until stdin is closed."""
    # Ctrl-C reaches the whole process group: the service stops its worker itself, by closing its stdin.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(WORKER_NICENESS)
    requests, answers = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever else writes to stdout goes to stderr, never into an answer
    while True:
        try:
            function, path, args = pickle.loads(_receive(requests))
        except EOFError:
            return
        try:
            reply = (True, function(path, *args))
        except ImageprovError as exc:
            reply = (False, exc)
        except Exception as exc:  # anything else fails this file, not the worker
            reply = (False, PkiError(f"cannot read {path}: {exc!r}"))
        try:
            message = pickle.dumps(reply)
        except Exception as exc:  # an error that cannot be sent back, as one that can
            message = pickle.dumps((False, PkiError(f"cannot read {path}: {exc!r}")))
        answers.write(_HEADER.pack(len(message)) + message)
        answers.flush()


class _Worker:
    """The process that reads the revocation files of every source: started at the first reload, and again
    after it dies or overruns ``RELOAD_DEADLINE``.

    A new interpreter, neither a fork of the service (it would copy its threads'
    locks in whatever state) nor multiprocessing's spawn (which runs the main
    module of whatever started the service again in it).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    def run(self, function: Callable[..., T], path: Path, *args: object) -> T:
        """``function(path, *args)`` in the worker process. Blocks: call it from a thread. One call at a time."""
        request = pickle.dumps((function, path, args))
        with self._lock:
            proc = self._proc if self._proc is not None and self._proc.poll() is None else self._start()
            assert proc.stdin is not None and proc.stdout is not None
            overran = threading.Event()

            def overrun() -> None:
                overran.set()
                proc.kill()

            watchdog = threading.Timer(RELOAD_DEADLINE, overrun)
            watchdog.start()
            try:
                proc.stdin.write(_HEADER.pack(len(request)) + request)
                proc.stdin.flush()
                reply = _receive(proc.stdout)
            except (OSError, EOFError) as exc:
                self._stop()
                if overran.is_set():
                    raise PkiError(
                        f"reading {path} took more than {RELOAD_DEADLINE:g} s", hint="is its filesystem answering?"
                    ) from None
                stopped = f"the process reading {path} stopped"
                raise PkiError(stopped, hint="was it killed? (out of memory: see the system log)") from exc
            finally:
                watchdog.cancel()
        ok, value = pickle.loads(reply)
        if not ok:
            raise value
        return cast(T, value)

    def _start(self) -> subprocess.Popen[bytes]:
        # The checkout or site-packages imageprov is in, whichever this one is; -P: not the working directory.
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen(
            [sys.executable, "-P", "-c", _WORKER_MAIN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        return self._proc

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        """Let the worker process end (it does when its stdin is closed), at the service's exit."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_WORKER = _Worker()
atexit.register(_WORKER.close)


class _FileSource(abc.ABC):
    """A revocation file, reloaded when it changes, as the module's docstring says."""

    name: str

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._reloads = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-reload")
        self._reloading = False  # a big file is being read in that thread
        # Read in this process, before the service serves: a file that is not good stops it from starting.
        self._good = self._load(None, here=True)  # the last good file: what a new one must not be older than
        self._state: _Loaded | _Failed = self._good  # what lookups are answered from

    @abc.abstractmethod
    def _load(self, previous: _Loaded | None, *, here: bool = False) -> _Loaded:
        """Read the file (in the worker process, or ``here``); raise ``ImageprovError`` if it is not good."""

    @abc.abstractmethod
    def _check(self, loaded: _Loaded) -> None:
        """Raise if what was read cannot be used now."""

    async def revoked_serials(self) -> frozenset[str]:
        stamp = _stamp(self.path)  # a missing file refuses at once, whatever is in force
        state = self._state
        if state.stamp != stamp or (isinstance(state, _Failed) and time.monotonic() - state.at >= RETRY_INTERVAL):
            self._reload(stamp)
            state = self._state
        if isinstance(state, _Failed):
            raise copy.copy(state.error)  # a copy: one exception raised by every lookup would pile up tracebacks
        self._check(state)
        return state.serials

    async def revoked(self, serial: str) -> bool:
        return serial in await self.revoked_serials()

    def _reload(self, stamp: _Stamp) -> None:
        """Read the file again: a small one now, a big one in the source's thread (unless one is being read)."""
        with self._lock:
            if self._reloading:
                return
            if stamp.size <= INLINE_SIZE:
                self._swap(self._attempt(stamp, here=True))
            else:
                self._reloading = True
                self._reloads.submit(self._reload_big, stamp)

    def _reload_big(self, stamp: _Stamp) -> None:
        # In the source's thread. The lock is taken only to swap: lookups never wait for the parse.
        state = self._attempt(stamp)
        with self._lock:
            self._swap(state)
            self._reloading = False

    def _attempt(self, stamp: _Stamp, *, here: bool = False) -> _Loaded | _Failed:
        try:
            return self._load(self._good, here=here)
        except ImageprovError as exc:
            return _Failed(exc, stamp, time.monotonic())
        except Exception as exc:  # anything else, too, refuses: never the old file for want of the new one
            return _Failed(PkiError(f"cannot read {self.path}: {exc!r}"), stamp, time.monotonic())

    def _swap(self, state: _Loaded | _Failed) -> None:
        # Under self._lock.
        self._state = state
        if isinstance(state, _Loaded):
            self._good = state


class DenylistSource(_FileSource):
    """Revoked serials in hex, one a line, '#' comments (Mender Gateway's MTLS_BLACKLIST_PATH)."""

    name = "denylist"

    def _load(self, previous: _Loaded | None, *, here: bool = False) -> _Loaded:
        stamp = _stamp(self.path)
        pieces = _read_denylist(self.path) if here else _WORKER.run(_read_denylist, self.path)
        return _Loaded(stamp, _serial_set(pieces))

    def _check(self, loaded: _Loaded) -> None:
        """A denylist has no date past which it is void."""


class CrlSource(_FileSource):
    """A CRL signed by the fleet CA. Past its nextUpdate it says nothing, and every device is refused,
    as nginx does with ``ssl_crl``."""

    name = "crl"

    def __init__(self, path: Path, ca_cert: x509.Certificate, *, clock: Callable[[], dt.datetime] = _utcnow) -> None:
        self.ca_cert = ca_cert
        self.clock = clock
        problem = crl_problem(ca_cert)
        if problem is not None:  # OpenSSL, and so nginx, refuses every device with such a CRL
            raise PkiError(f"the fleet CA cannot sign CRLs: {problem}", hint="use --denylist")
        self._ca_der = ca_cert.public_bytes(serialization.Encoding.DER)  # what the worker process is sent
        super().__init__(path)

    def _load(self, previous: _Loaded | None, *, here: bool = False) -> _Loaded:
        stamp = _stamp(self.path)
        facts = _read_crl(self.path, self._ca_der) if here else _WORKER.run(_read_crl, self.path, self._ca_der)
        if previous is not None and (
            facts.last_update < (previous.last_update or facts.last_update)
            or (facts.number is not None and previous.number is not None and facts.number < previous.number)
        ):
            # A CRL from before the one in force would bring back what was revoked since.
            raise PkiError(f"{self.path} is older than the CRL it replaces", hint="publish a new one: imageprov crl")
        return _Loaded(stamp, _serial_set(facts.pieces), facts.next_update, facts.last_update, facts.number)

    def _check(self, loaded: _Loaded) -> None:
        if loaded.next_update is not None and self.clock() > loaded.next_update:
            raise PkiError(f"the CRL {self.path} is past its nextUpdate", hint="publish a new one: imageprov crl")
