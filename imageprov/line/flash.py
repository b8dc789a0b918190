"""The line station: stamp straight onto cards, many at once, with no image file per device.

Per batch, what is the same for every device is prepared once, as ``stamp``
does (the same code: :class:`imageprov.line.stamp.Batch`), but in a sparse
scratch file that holds only the partitions that change. Per device, a key
and certificate are issued and written, with the device id
(:func:`imageprov.line.stamp.device_files`), into a private sparse copy of the
data partition only, which is checked as ``stamp`` checks an image. Then
every card is written at once from one pass over the golden image
(:mod:`imageprov.disk.fanout`): the blocks a bmap covers, each card's data
partition from its own scratch copy. Each card is then read back (checksums)
and verified on the device node itself, and only then is the device marked
delivered in the registry, with the card's identity.

The line never clones an identity: a device id already delivered is refused
unless ``reissue`` (which revokes the old certificate), and a card that fails
at any step has its certificate revoked. Every attempt is appended to the
line log.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import json
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from imageprov.disk.blockdev import BlockDevice, TargetError, check_target, flush_buffers, open_exclusive
from imageprov.disk.bmap import BLOCK, mapped_blocks, must_map
from imageprov.disk.copy import data_ranges, remove_stale, stage
from imageprov.disk.fanout import Outcome, Span, Target, fan_out, read_back
from imageprov.disk.image import DiskImage
from imageprov.disk.layout import Role, Volume
from imageprov.errors import ImageprovError, PkiError
from imageprov.line.stamp import Batch, Engine, StampOptions, _message
from imageprov.mender.verify import verify_image
from imageprov.pki.ca import CertificateAuthority, Issued
from imageprov.pki.registry import Reason, Record, Registry, RegistryUnavailable, Status

LOG_NAME = "line-log.jsonl"
WORKDIR_PREFIX = "imageprov-flash-"
# In each scratch directory, made with stage(): locked by the station that works there, for as long as it runs.
WORKDIR_OWNER = "owner"
# A scratch directory gets its owner file the moment it is made: one with none for this long never will.
UNOWNED_SECONDS = 60


class Result(enum.Enum):
    DELIVERED = "delivered"
    FAILED = "failed"


class Failure(enum.Enum):
    """Why a card failed, in as few words as a metric's label (and the line log) need."""

    REFUSED = "refused"  # not a card that may be written: too small, read-only, mounted, not removable
    ALREADY_DELIVERED = "already_delivered"  # the device id is on another card already
    STAMP = "stamp"  # the device's own data partition could not be made
    BUSY = "busy"  # the card could not be opened for writing alone
    WRITE = "write"
    READ_BACK = "read_back"  # what the card reads back is not what was written
    VERIFY = "verify"  # the card, read as a device would, fails a check
    NOT_CONFIRMED = "not_confirmed"  # written and checked, but the registry did not confirm the delivery
    INTERRUPTED = "interrupted"

    @property
    def at_the_slot(self) -> bool:
        """The card or its reader is the cause (the others are the station's): twice in one slot, the reader."""
        return self in (Failure.REFUSED, Failure.BUSY, Failure.WRITE, Failure.READ_BACK, Failure.VERIFY)


class Phase(enum.StrEnum):
    """Where a card is in its batch (``Progress.phase``); the last two are ``Result``'s."""

    WAITING = "waiting"
    STAMPING = "stamping"
    WRITING = "writing"
    READING_BACK = "reading back"
    VERIFYING = "verifying"
    DELIVERED = Result.DELIVERED.value
    FAILED = Result.FAILED.value


class AlreadyDelivered(ImageprovError):
    """The device's identity is already on a card."""


@dataclass(frozen=True)
class FlashOptions:
    stamp: StampOptions = field(default_factory=StampOptions)
    force: bool = False  # allow targets that are not removable disks
    scratch_dir: Path | None = None  # where the small per-device scratch files go (default: $TMPDIR)
    log: Path | None = None  # the line log (default: PKI/line-log.jsonl)


@dataclass(frozen=True)
class Assignment:
    device_id: str
    target: Path


@dataclass(frozen=True)
class Flashed:
    """What happened to one card."""

    device_id: str
    target: Path
    result: Result
    card: str | None = None
    card_serial: str | None = None
    serial: str | None = None  # the certificate's
    fingerprint: str | None = None
    bytes_written: int = 0
    seconds: float = 0.0
    error: str = ""
    notes: tuple[str, ...] = ()
    failure: Failure | None = None  # set when failed

    def to_dict(self) -> dict[str, object]:
        return {
            "device_id": self.device_id,
            "target": str(self.target),
            "result": self.result.value,
            "card": self.card,
            "card_serial": self.card_serial,
            "serial": self.serial,
            "fingerprint": self.fingerprint,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            **({"error": self.error} if self.error else {}),
            **({"failure": self.failure.value} if self.failure else {}),
        }


@dataclass
class Progress:
    """One card's state, for a progress line (updated while the batch runs)."""

    device_id: str
    target: Path
    phase: Phase = Phase.WAITING
    written: int = 0
    total: int = 0


@dataclass(frozen=True)
class WritePass:
    """One pass over the golden image that wrote every card of a batch."""

    cards: int
    golden_bytes: int  # what the cards needed of the golden image
    golden_read: int  # what was read of it: ``golden_bytes`` when it was read once for all of them

    @property
    def golden_reads(self) -> float:
        return self.golden_read / self.golden_bytes if self.golden_bytes else 0.0


@dataclass
class _Card:
    index: int
    assignment: Assignment
    device: BlockDevice
    issued: Issued
    started: float
    progress: Progress
    notes: tuple[str, ...] = ()
    scratch: Path | None = None
    fd: int | None = None
    direct: bool = False
    checked: bool = False
    outcome: Outcome | None = None
    error: str | None = None
    failure: Failure | None = None

    def fail(self, failure: Failure, error: str) -> None:
        self.failure, self.error = failure, error


def _spans_in(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    return [(max(a, start), min(b, end)) for a, b in ranges if max(a, start) < min(b, end)]


def _outside(ranges: list[tuple[int, int]], regions: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for a, b in ranges:
        pieces = [(a, b)]
        for s, e in regions:
            pieces = [p for x, y in pieces for p in ((x, min(y, s)), (max(x, e), y)) if p[0] < p[1]]
        out += pieces
    return out


def _byte_ranges(path: Path, extra: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    return [(first * BLOCK, min((last + 1) * BLOCK, size)) for first, last in mapped_blocks(path, extra)]


def copy_spans(src: Path, dst: Path, spans: Sequence[tuple[int, int]]) -> int:
    """Copy the data of ``src`` inside ``spans`` to the same offsets of ``dst`` (holes elsewhere); bytes copied.

    ``dst`` ends up as large as ``src``: a sparse file that is the image
    wherever a span is, and a hole everywhere else.
    """
    copied = 0
    with open(src, "rb") as source, open(dst, "r+b") as target:
        size = os.fstat(source.fileno()).st_size
        data = list(data_ranges(source.fileno(), size))
        for start, end in spans:
            for a, b in _spans_in(data, start, end):
                while a < b:
                    try:
                        n = os.copy_file_range(source.fileno(), target.fileno(), b - a, a, a)
                    except OSError:  # across filesystems, or not supported
                        n = os.pwrite(target.fileno(), os.pread(source.fileno(), min(b - a, 1 << 20), a), a)
                    if n == 0:
                        raise ImageprovError(f"{src} ended while it was being copied")
                    a += n
                    copied += n
        os.ftruncate(target.fileno(), size)
    return copied


def make_workdir(parent: Path | None) -> tuple[Path, Path]:
    """A new private (0700) scratch directory, and the file inside it that marks it as this process's.

    That file is made with ``stage`` as stamp makes its partial outputs: locked for as long as this
    process may still work there, whatever ends it, and seen so by any other station on any host or in
    any PID namespace (``remove_stale``). The pid in the directory's name is for people only.
    """
    workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-", dir=parent))
    try:
        return workdir, stage(workdir / WORKDIR_OWNER)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _owners(workdir: Path) -> list[Path]:
    return list(workdir.glob(f".{WORKDIR_OWNER}.*.partial"))


def remove_stale_workdirs(parent: Path | None) -> list[Path]:
    """Remove the scratch directories (device keys among them) that flash processes no longer running left.

    A directory is another station's for as long as that station holds the lock of its owner file,
    whatever its pid means here: another host sharing the directory, another PID namespace, a pid
    reused since. One without an owner file is one being made, for the instant between mkdtemp and
    its owner file; one that has had none for a minute is an older imageprov's, whose keys must not
    outlive it either.
    """
    removed = []
    for found in Path(parent or tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*-*"):
        try:
            info = found.lstat()
        except FileNotFoundError:
            continue  # removed meanwhile, by its station or another
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue
        owned = bool(_owners(found))  # looked at first: an owner made after this is a station starting
        remove_stale(found)  # what processes that are gone left there, their owner file included
        unowned_since = time.time() - info.st_mtime
        if (owned and not _owners(found)) or (not owned and unowned_since > UNOWNED_SECONDS):
            shutil.rmtree(found, ignore_errors=True)
            removed.append(found)
    return removed


def _new_workdir(parent: Path | None) -> tuple[Path, Path]:
    try:
        return make_workdir(parent)
    except OSError as exc:
        where = parent or tempfile.gettempdir()
        raise ImageprovError(
            f"cannot make a scratch directory in {where}: {exc.strerror}",
            hint="--scratch names a writable directory (default: TMPDIR)",
        ) from exc


class FlashBatch(Batch):
    """Flash many cards from one golden image. Use as a context manager."""

    def __init__(
        self, golden: Path, pki_dir: Path, ca: CertificateAuthority, registry: Registry, options: FlashOptions
    ) -> None:
        self.flash_options = options
        self.pki_dir = pki_dir
        self.batch_volumes: tuple[Volume, ...] = ()
        self._data_source: Path | None = None
        self._data_scratch: Path | None = None
        self.golden_bytes_read = 0
        self.last_pass: WritePass | None = None  # the last flash()'s, if it wrote any card
        # A registry lost while cards were being confirmed (flash() raises it), and the cards it left unconfirmed.
        self._lost: RegistryUnavailable | None = None
        self._unconfirmed_cards: list[_Card] = []
        # Private (0700): the per-device scratch files hold private keys. Its
        # lock lets a later run remove what a killed one left, and only that.
        self.stale_workdirs = remove_stale_workdirs(options.scratch_dir)
        self.workdir, self._workdir_owner = _new_workdir(options.scratch_dir)
        self.log = options.log or pki_dir / LOG_NAME
        try:  # before any card is written: a line log that cannot be written stops the line
            os.close(os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640))
        except OSError as exc:
            self._remove_workdir()
            raise ImageprovError(f"cannot write the line log {self.log}: {exc.strerror}", hint="use --log") from exc
        try:
            super().__init__(golden, self.workdir, ca, registry, replace(options.stamp, engine=Engine.DEBUGFS))
        except BaseException:
            self._remove_workdir()
            raise
        self.image_size = os.stat(self.plain).st_size

    def __enter__(self) -> FlashBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._remove_workdir()

    def _remove_workdir(self) -> None:
        # Its owner file goes with it: a station that looks meanwhile only helps remove it.
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- the per-batch and per-device copies: partitions only -------------------

    def _private_copy(self, rootfs: bool = True) -> Path:
        # The data partition, and the rootfs partitions only if they change
        # (or hold a journal to replay): a sparse file of the image's size with
        # holes everywhere else. The write pass reads what is here from here.
        layout = self.disk.layout
        if self._scratch is None:
            self._scratch = self._stage(self.out_dir / f"imageprov-batch{self.plain.suffix}")
        wanted = (layout.data_partition, *(layout.rootfs_partitions if rootfs else ()))
        new = tuple(v for v in wanted if v not in self.batch_volumes)
        spans = [(v.partition.offset, v.partition.end) for v in new]
        self.golden_bytes_read += copy_spans(self.plain, self._scratch, spans)
        self.batch_volumes += new
        return self._scratch

    def _rootfs_view(self, disk: DiskImage) -> DiskImage:
        rootfs_copied = any(v.role in (Role.ROOTFS_A, Role.ROOTFS_B) for v in self.batch_volumes)
        return disk if rootfs_copied else self.disk

    def prepare(self) -> Path:
        source = super().prepare()
        if self._data_source is None:
            if source == self.plain:
                # A prepared golden image: the data partition is still copied
                # once, so that the golden image is read once per batch.
                data = self.disk.layout.data_partition.partition
                self._data_scratch = self._stage(self.workdir / f"imageprov-data{self.plain.suffix}")
                self.golden_bytes_read += copy_spans(self.plain, self._data_scratch, [(data.offset, data.end)])
                self._data_source = self._data_scratch
            else:
                self._data_source = source
        return source

    def _copy_for_device(self, temp: Path) -> None:
        assert self._data_source is not None
        data = self.disk.layout.data_partition.partition
        copy_spans(self._data_source, temp, [(data.offset, data.end)])

    # -- the registry side --------------------------------------------------------

    def delivery(self, device_id: str) -> Record | None:
        """The device's certificate if it is already on a card or in an image."""
        live = self.registry.live(device_id, kind=self.options.kind)
        return live if live is not None and live.status is Status.ACTIVE else None

    def delivered_among(self, device_ids: Sequence[str]) -> set[str]:
        """Those of ``device_ids`` already on a card or in an image: asked in bulk, for a line's whole list."""
        found = self.registry.live_of(device_ids, kind=self.options.kind)
        return {i for i, live in found.items() if live.status is Status.ACTIVE}

    def _issue(self, device_id: str) -> tuple[Issued, list[str]]:
        done = self.delivery(device_id)
        if done is not None and not self.options.reissue:
            raise AlreadyDelivered(
                f"{device_id} was already delivered ({done.delivered_to or 'unknown'}, {done.delivered_at or '?'}):"
                " a second card would clone its identity",
                hint="pass --reissue to revoke its certificate and flash a new one",
            )
        notes = self._revoke_undelivered(device_id)
        if done is not None:
            notes.append(f"revoked certificate {done.serial} (superseded): delivered before to {done.delivered_to}")
        issued, more = self._issue_credential(device_id)
        return issued, notes + more

    # -- the batch ---------------------------------------------------------------------

    def flash(
        self, assignments: Sequence[Assignment], on_progress: Callable[[list[Progress]], None] | None = None
    ) -> list[Flashed]:
        """Flash each assignment's device onto its target; one result per assignment, in order.

        A target that fails (refused, write error, read-back or verify
        mismatch) does not stop the others, and its certificate is revoked.
        A registry that stops answering (or is lost) stops the batch instead,
        with ``RegistryUnavailable`` naming the cards it could not confirm:
        their certificates stay pending, so that nothing is delivered twice.
        """
        self.prepare()
        progress = [Progress(a.device_id, a.target) for a in assignments]
        results: dict[int, Flashed] = {}
        cards: list[_Card] = []
        shown = [0.0]
        self._lost, self._unconfirmed_cards = None, []
        self.last_pass = None

        def report(force: bool = False) -> None:
            now = time.monotonic()
            if on_progress is not None and (force or now - shown[0] >= 0.5):
                shown[0] = now
                on_progress(progress)

        try:
            self._claim(assignments, progress, results, cards)
            live = self._stamp_all(cards, report)
            live = self._open_all(live)
            self._write_all(live, report)
            self._check_all([c for c in live if c.error is None], report)
        finally:
            for card in cards:
                if card.fd is not None:
                    os.close(card.fd)
                if card.scratch is not None:
                    card.scratch.unlink(missing_ok=True)
                if card.index not in results:
                    results[card.index] = self._settle(card)
                    card.progress.phase = Phase(results[card.index].result.value)
            for _, flashed in sorted(results.items()):
                self._log(flashed)
            report(force=True)
        if self._lost is not None:
            raise self._unconfirmed(self._lost, self._unconfirmed_cards)
        return [results[i] for i in range(len(assignments))]

    def _unconfirmed(self, lost: RegistryUnavailable, written: list[_Card]) -> RegistryUnavailable:
        """The registry's error, with what it leaves behind: cards written and checked, never confirmed."""
        if not written:
            return lost
        names = ", ".join(f"{c.assignment.device_id} on {c.assignment.target}" for c in written[:10])
        return type(lost)(
            f"{lost.message}; {len(written)} card(s) written and checked but not marked delivered: {names}",
            hint="the registry may have recorded some before it stopped answering (those cards are live); the "
            "others stay pending, and the edge refuses them: once it answers, 'imageprov registry check --pki PKI' "
            "names them; flash those ids again (which revokes them), or 'imageprov revoke --pki PKI --stale'",
        )

    def _claim(
        self,
        assignments: Sequence[Assignment],
        progress: list[Progress],
        results: dict[int, Flashed],
        cards: list[_Card],
    ) -> None:
        # Cards are added to ``cards`` as their certificates are issued, so that an interruption revokes them.
        claimed: dict[int, Path] = {}
        for index, assignment in enumerate(assignments):
            started = time.perf_counter()
            try:
                device = check_target(
                    assignment.target,
                    image_size=self.image_size,
                    protected=[self.golden, self.pki_dir, self.workdir, self.log],
                    force=self.flash_options.force,
                )
                if device.rdev in claimed:
                    raise TargetError(f"target {assignment.target} is the same disk as {claimed[device.rdev]}")
                claimed[device.rdev] = assignment.target
                issued, notes = self._issue(assignment.device_id)
            except RegistryUnavailable:
                raise  # no card can be issued or confirmed without it: the batch stops here
            except (ImageprovError, OSError) as exc:
                progress[index].phase = Phase.FAILED
                failure = Failure.ALREADY_DELIVERED if isinstance(exc, AlreadyDelivered) else Failure.REFUSED
                results[index] = Flashed(
                    assignment.device_id, assignment.target, Result.FAILED, error=_message(exc), failure=failure
                )
                continue
            cards.append(_Card(index, assignment, device, issued, started, progress[index], tuple(notes)))

    def _stamp_all(self, cards: list[_Card], report: Callable[..., None]) -> list[_Card]:
        def stamp(card: _Card) -> None:
            card.progress.phase = Phase.STAMPING
            card.scratch = stage(self.workdir / f"{card.assignment.device_id}.data")
            self._write_and_check(card.scratch, card.assignment.device_id, card.issued)

        with ThreadPoolExecutor(max_workers=max(1, self.options.workers), thread_name_prefix="imageprov-stamp") as pool:
            futures = [(card, pool.submit(stamp, card)) for card in cards]
            report(force=True)
            for card, future in futures:
                try:
                    future.result()
                except (ImageprovError, OSError) as exc:
                    card.fail(Failure.STAMP, _message(exc))
        return [c for c in cards if c.error is None]

    def _open_all(self, cards: list[_Card]) -> list[_Card]:
        for card in cards:
            try:
                card.fd, card.direct = open_exclusive(card.device)
            except ImageprovError as exc:
                card.fail(Failure.BUSY, str(exc))
        return [c for c in cards if c.error is None]

    def _write_all(self, cards: list[_Card], report: Callable[..., None]) -> None:
        if not cards:
            return
        layout = self.disk.layout
        data = layout.data_partition.partition
        own = (data.offset, data.end)
        changed = [(v.partition.offset, v.partition.end) for v in self.batch_volumes if v.role is not Role.DATA]
        golden_map = _byte_ranges(self.plain, must_map(layout, self.image_size), self.image_size)
        spans = [Span(a, b, self.plain) for a, b in _outside(golden_map, [own, *changed])]
        if changed:
            assert self._source is not None
            batch_map = _byte_ranges(self._source, [], self.image_size)
            spans += [Span(a, b, self._source) for s, e in changed for a, b in _spans_in(batch_map, s, e)]
        spans.append(Span(*own, None))
        targets = []
        for card in cards:
            assert card.scratch is not None and card.fd is not None
            name = f"{card.assignment.target} ({card.device.name})"
            ranges = tuple(_spans_in(_byte_ranges(card.scratch, [], self.image_size), *own))
            targets.append(Target(name, card.assignment.target, card.fd, card.direct, card.device.logical_block,
                                  card.scratch, ranges))  # fmt: skip
            card.progress.phase = Phase.WRITING

        def on_chunk(outcomes: list[Outcome]) -> None:
            for card, outcome in zip(cards, outcomes):
                card.progress.written, card.progress.total = outcome.written, outcome.total
            report()

        outcomes, read = fan_out(spans, targets, on_chunk=on_chunk)
        self.golden_bytes_read += read.get(self.plain, 0)
        golden_bytes = sum(s.end - s.start for s in spans if s.source == self.plain)
        self.last_pass = WritePass(len(cards), golden_bytes, read.get(self.plain, 0))
        for card, outcome in zip(cards, outcomes):
            card.outcome = outcome
            card.progress.written, card.progress.total = outcome.written, outcome.total
            if outcome.error is not None:
                card.fail(Failure.WRITE, outcome.error)
            assert card.fd is not None
            os.close(card.fd)
            card.fd = None

    def _check_all(self, cards: list[_Card], report: Callable[..., None]) -> None:
        def check(card: _Card) -> None:
            assert card.outcome is not None
            card.progress.phase = Phase.READING_BACK
            differs = read_back(card.outcome.target, card.outcome.chunks)
            if differs is not None:
                card.fail(Failure.READ_BACK, differs)
                return
            card.progress.phase = Phase.VERIFYING
            fd = os.open(card.assignment.target, os.O_RDONLY | os.O_CLOEXEC)
            try:
                flush_buffers(fd)  # what verify reads comes from the card, not from the page cache
            finally:
                os.close(fd)
            checked = verify_image(
                card.assignment.target,
                self.ca.cert,
                device_id=card.assignment.device_id,
                overrides=self.options.overrides,
                auth_key=self.options.settings.auth_key,
            )
            if not checked.ok:
                failed = checked.failures[0]
                card.fail(
                    Failure.VERIFY,
                    f"{card.outcome.target.name}: the card fails '{failed.name}': {failed.detail}".rstrip(": "),
                )
            elif checked.serial != card.issued.serial_hex:
                card.fail(
                    Failure.VERIFY, f"{card.outcome.target.name}: the card holds certificate {checked.serial}, not ours"
                )
            else:
                card.checked = True

        with ThreadPoolExecutor(max_workers=max(1, len(cards)), thread_name_prefix="imageprov-check") as pool:
            futures = [(card, pool.submit(check, card)) for card in cards]
            report(force=True)
            for card, future in futures:
                try:
                    future.result()
                except (ImageprovError, OSError) as exc:
                    card.fail(Failure.VERIFY, f"{card.assignment.target}: {_message(exc)}")

    def _settle(self, card: _Card) -> Flashed:
        """Deliver a card that passed every step; revoke the certificate of one that did not."""
        done = card.checked and card.error is None
        issued, device = card.issued, card.device
        if done:
            try:
                self.registry.deliver(issued.serial_hex, f"card {card.assignment.target}: {device.identity}")
            except RegistryUnavailable as exc:  # not confirmed: stays pending, and the batch stops
                self._lost = self._lost or exc
                self._unconfirmed_cards.append(card)
                done = False
                card.fail(Failure.NOT_CONFIRMED, f"{card.assignment.target}: written and checked, not confirmed: {exc}")
            except PkiError as exc:  # revoked meanwhile: the card holds a dead identity
                done = False
                card.fail(Failure.NOT_CONFIRMED, f"{card.assignment.target}: {exc}")
        if not done and self._lost is None:
            # The certificate will never be used by a device: it must not stay live. (With the registry
            # lost, it cannot be revoked: it stays pending, stale once this station ends, for revoke --stale.)
            with contextlib.suppress(PkiError):  # already revoked
                self.registry.revoke(serial=issued.serial_hex, reason=Reason.CESSATION_OF_OPERATION)
        error = card.error or ("" if done else "interrupted before the card was written and checked")
        failure = None if done else card.failure or Failure.INTERRUPTED
        return Flashed(
            card.assignment.device_id,
            card.assignment.target,
            Result.DELIVERED if done else Result.FAILED,
            device.identity,
            device.serial,
            issued.serial_hex,
            issued.fingerprint,
            card.outcome.written if card.outcome else 0,
            time.perf_counter() - card.started,
            error,
            card.notes,
            failure,
        )

    def _log(self, flashed: Flashed) -> None:
        """Append one line to the line log: who, which card, when, what came of it (never rewritten)."""
        entry = {
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "station": f"{socket.gethostname()}:{os.getpid()}",
            "golden": str(self.golden),
            **flashed.to_dict(),
        }
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            # One write per line: O_APPEND keeps lines of several stations whole.
            os.write(fd, (json.dumps(entry) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
