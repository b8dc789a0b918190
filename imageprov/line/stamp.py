"""The stamping pipeline: one complete, checked image per device.

What is the same for every device (mender.conf on both rootfs partitions, or
the data partition's fallback config) is done and checked once per batch, on
a private copy of the golden image (``prepare``). Per device, that copy is
copied again (reflink or sparse), the device's key, certificate and id are
written into the data partition with a write plan made once, the data
partition is checked, and the image is published under its final name only
once its data are on disk. Publishing runs in a second thread, so that one
device's fsync overlaps the next device's copy. The golden image is only ever
opened read-only.

Registry states make reruns safe: a certificate is ``pending`` from issue
until its image has its final name, then ``active``. On a rerun, a device
whose image holds its live certificate is left as it is (a pending one that
matches its image becomes active); an image whose certificate is revoked or
unknown, or any image under ``--reissue``, is moved into ``OUT/superseded/``
and the device is stamped anew; a pending certificate of a process that is
gone, and whose image never got its final name, is revoked (``superseded``).
An interrupt (Ctrl-C) stops every image not yet published from ever being
published, and revokes their certificates: an image is never published under
a certificate that is not live.
"""

from __future__ import annotations

import enum
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from imageprov.disk.bmap import bmap_for
from imageprov.disk.compress import Compression, compress, decompress_sparse, inner_name
from imageprov.disk.copy import copy_image, discard_staged, publish, remove_stale, stage
from imageprov.disk.ext4 import NewFile, WritePlan, fsck
from imageprov.disk.image import DiskImage
from imageprov.disk.layout import Overrides, Role
from imageprov.errors import ImageprovError, PkiError, UsageError
from imageprov.mender import mender_artifact
from imageprov.mender.conf import Settings
from imageprov.mender.enroll import BOOTSTRAP_CERT, ENROLL_PATHS, Enrollment
from imageprov.mender.prepare import ConfTarget, apply_changes, plan_changes, resolve_target
from imageprov.mender.verify import (
    CERT_PATH,
    DATA_CONF_PATH,
    DEVICE_ID_FILE,
    DEVICE_ID_PATH,
    KEY_PATH,
    Checks,
    check_data_partition,
    check_enroll_program,
    check_fsck,
    check_mender_confs,
    device_id_text,
    verify_image,
)
from imageprov.pki.ca import CertificateAuthority, Curve, Issued
from imageprov.pki.registry import Kind, Reason, Record, Registry, RegistryUnavailable, Status

# A stamped image holds the device's private key: readable by its owner only.
IMAGE_MODE = 0o600
# Where images that are not delivered (their certificate is not live) are moved, inside OUT.
SUPERSEDED = "superseded"
# Where device_files() go on the data partition: known before any certificate is issued, so that
# one write plan serves the whole batch (a plan and files that differ are refused when applied).
DEVICE_PATHS = (KEY_PATH.inner, CERT_PATH.inner, DEVICE_ID_PATH.inner)
# And enrolling_files(): the bootstrap credential, and the device id as well.
ENROLLING_PATHS = (*ENROLL_PATHS, DEVICE_ID_PATH.inner)


def device_files(device_id: str, issued: Issued) -> list[NewFile]:
    """What one device gets on its data partition, for stamp and flash alike.

    Its key (0600) and certificate, and its id in ``DEVICE_ID_FILE`` for an
    identity script to send as ``id_data[NAME]`` (``edge serve --identity attribute:NAME``).
    """
    return [
        NewFile(KEY_PATH.inner, issued.key_pem(), 0o600),
        NewFile(CERT_PATH.inner, issued.cert_pem()),
        NewFile(DEVICE_ID_PATH.inner, device_id_text(device_id)),
    ]


def enrolling_files(
    device_id: str, issued: Issued, enrollment: Enrollment, ca: CertificateAuthority, server_ca: str | None
) -> list[NewFile]:
    """What one device that enrolls at first boot gets (``--enroll``): its bootstrap credential, and its id.

    ``server_ca``: the file the client trusts the edge by (its ServerCertificate), which enrolling trusts too.
    """
    return [
        *enrollment.files(device_id, issued, ca.cert.public_bytes(serialization.Encoding.PEM), server_ca),
        NewFile(DEVICE_ID_PATH.inner, device_id_text(device_id)),
    ]


class Engine(enum.Enum):
    DEBUGFS = "debugfs"
    MENDER_ARTIFACT = "mender-artifact"


@dataclass(frozen=True)
class StampOptions:
    settings: Settings = field(default_factory=Settings)
    conf_target: ConfTarget = ConfTarget.AUTO
    engine: Engine = Engine.DEBUGFS
    days: int = 3650
    curve: Curve = Curve.P256
    reissue: bool = False
    overrides: Overrides = field(default_factory=Overrides)
    bmap: bool = False  # write <ID>.bmap beside each image
    compress: Compression | None = None
    # Enroll at first boot (a bootstrap credential, the key made on the device), or None: the device's key.
    # ``settings`` are then the enrolling ones (Enrollment.settings).
    enroll: Enrollment | None = None
    # Images built at once; the work is mostly waiting on the kernel and disk.
    workers: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))

    def __post_init__(self) -> None:
        if self.days < 1:
            raise UsageError(f"a certificate valid for {self.days} days is never valid", hint="give --days 1 or more")
        if self.enroll is not None and self.engine is Engine.MENDER_ARTIFACT:
            raise UsageError("--enroll writes with debugfs only", hint="leave out --engine mender-artifact")

    @property
    def kind(self) -> Kind:
        """What a device is issued: its certificate, or (enrolling) a bootstrap certificate."""
        return Kind.BOOTSTRAP if self.enroll is not None else Kind.DEVICE


@dataclass(frozen=True)
class Stamped:
    device_id: str
    image: Path
    serial: str
    fingerprint: str
    status: str  # "stamped" or "already-delivered"
    seconds: float
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Failed:
    device_id: str
    error: str


Outcome = Stamped | Failed


class _Gate:
    """Whether a job's image may still get its final name.

    The worker publishes and the main thread cancels under one lock, so that
    an image is never published under a certificate revoked meanwhile.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cancelled = False
        self.published = False

    def cancel(self) -> None:
        """Stop the image from being published, unless it already was."""
        with self.lock:
            self.cancelled = not self.published


class _Cancelled(Exception):
    """The batch was interrupted before this image was published."""


@dataclass(frozen=True)
class _Job:
    """A device whose certificate is issued (pending) and whose image is to be built."""

    device_id: str
    final: Path
    issued: Issued
    started: float
    notes: tuple[str, ...]
    gate: _Gate = field(default_factory=_Gate)


def output_path(golden: Path, out_dir: Path, device_id: str, compression: Compression | None = None) -> Path:
    """``OUT_DIR/<ID><golden's image suffix>[.COMPRESSION]``, e.g. dev-0001.sdimg or dev-0001.sdimg.zst."""
    suffix = Path(inner_name(golden)).suffix or ".img"
    return out_dir / f"{device_id}{suffix}{compression.suffix if compression else ''}"


def check_outputs(golden: Path, out_dir: Path, device_ids: list[str], compression: Compression | None = None) -> None:
    """Refuse an output directory that is not one, or an output that would be the golden image."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --out {out_dir}: {exc.strerror}") from exc
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out_dir} is not writable")
    for device_id in device_ids:
        target = output_path(golden, out_dir, device_id, compression)
        if target.exists() and os.path.samefile(target, golden):
            raise UsageError(
                f"the output for {device_id} would overwrite the golden image {golden}",
                hint="choose another --out directory",
            )


class Batch:
    """Stamp many devices from one golden image. Use as a context manager."""

    def __init__(
        self, golden: Path, out_dir: Path, ca: CertificateAuthority, registry: Registry, options: StampOptions
    ) -> None:
        self.golden = golden
        self.out_dir = out_dir
        # Leftovers of a killed run: never under a final name, but not to be kept either.
        self.removed = remove_stale(out_dir)
        self.ca = ca
        self.registry = registry
        self.options = options
        self.notes: tuple[str, ...] = ()
        # Devices whose image is in place, stamped now or before: said on an interrupt.
        self.delivered: set[str] = set()
        # Devices being stamped by this run: issued a certificate (their job, once made), not yet finished.
        self._open: dict[str, _Job | None] = {}
        self._source: Path | None = None
        self._conf_target = options.conf_target
        self._plan: WritePlan | None = None
        # The ServerCertificate the client uses in the prepared image: enrolling trusts the edge by it too.
        self._server_certificate: str | None = None
        self._scratch: Path | None = None
        # The live certificates of the devices of the current run, read once at its start (run());
        # None where nothing was read ahead (flash, a card at a time): each device is asked on its own.
        self._live_at_start: dict[str, Record] | None = None
        # What this batch staged files for (scratch copies): removed at the end, however it ends.
        self._staging: list[Path] = []
        # The image every copy starts from: the golden image, or its decompressed copy.
        self.plain = golden
        self._decompressed: Path | None = None
        try:
            if Compression.of(golden) is not None:
                self._decompressed = self.plain = self._stage(out_dir / inner_name(golden))
                decompress_sparse(golden, self.plain)
            self.disk = DiskImage.open(self.plain, options.overrides)
            if self.disk.layout.is_bare and self.disk.layout.data_volume is None:
                # A .dataimg is stamped (for lines that flash partitions apart); a rootfs holds no credentials.
                raise UsageError(f"{golden} is a bare root filesystem image",
                                 hint="stamp the whole disk image, or the build's .dataimg")  # fmt: skip
        except BaseException:
            self.__exit__()
            raise

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: object) -> None:
        for scratch in (self._scratch, self._decompressed):
            if scratch is not None:
                scratch.unlink(missing_ok=True)
        for final in self._staging:
            discard_staged(final)

    def _stage(self, final: Path) -> Path:
        """A scratch file staged for ``final``, discarded by ``__exit__`` even if an interrupt loses its name."""
        self._staging.append(final)
        return stage(final)

    # -- once per batch -------------------------------------------------------

    def prepare(self) -> Path:
        """Do and check what is the same for every device, once; return the image to copy per device."""
        if self._source is not None:
            return self._source
        notes = [f"golden image: {warning}" for warning in self.disk.layout.table.warnings]
        source = self.plain
        if self.disk.unreplayed():
            # Never written behind: the kernel would replay it over the device's key at first mount.
            source = self._private_copy()
            names = self.disk.at(source).replay_journals()
            notes.append(f"replayed the journal of {', '.join(names)} on a private copy; the golden image "
                         "still needs it (e2fsck -E journal_only, or unmount before dd)")  # fmt: skip
        self._check_golden(self.disk.at(source))
        self._conf_target = resolve_target(self.disk.at(source), self.options.conf_target)
        if self.options.engine is Engine.MENDER_ARTIFACT:
            self.notes = tuple(notes)
            self._source = source
            return self._source
        changes, more = plan_changes(self.disk.at(source), self.options.settings, self._conf_target)
        notes += more
        if changes:
            source = self._private_copy(rootfs=any(v.role in (Role.ROOTFS_A, Role.ROOTFS_B) for v, _, _ in changes))
            apply_changes(self.disk.at(source), changes)
        else:
            notes.append("golden image already prepared: only the data partition changes per device")
        disk = self.disk.at(source)
        self._check_prepared(disk)
        paths = ENROLLING_PATHS if self.options.enroll is not None else DEVICE_PATHS
        self._plan = disk.ext(disk.layout.data_partition).plan(paths)
        self.notes = tuple(notes)
        self._source = source
        return source

    def _check_golden(self, disk: DiskImage) -> None:
        # Once, before any certificate is issued: a data partition that no
        # device image could pass with is refused here, not per device.
        data = disk.ext(disk.layout.data_partition)
        data.check_writable()
        clean, findings = fsck(disk.path, data.offset)
        if not clean:
            raise ImageprovError(
                f"the golden image's {data.name} fails e2fsck -fn: {findings}",
                hint="repair the golden image (e2fsck -f on the partition), then stamp again",
            )

    def _private_copy(self, rootfs: bool = True) -> Path:
        """The batch's private copy of the golden image, made once: the whole image.

        flash overrides this (and ``_rootfs_view``, ``_copy_for_device``) to
        copy only the data partition, and the rootfs partitions if ``rootfs``.
        """
        if self._scratch is None:
            self._scratch = self._stage(self.out_dir / f"imageprov-batch{self.plain.suffix}")
            copy_image(self.plain, self._scratch, mode=IMAGE_MODE)
        return self._scratch

    def _rootfs_view(self, disk: DiskImage) -> DiskImage:
        """Where the prepared rootfs partitions are read: the private copy, when it holds them."""
        return disk

    def _copy_for_device(self, temp: Path) -> None:
        """Copy the prepared image to ``temp``, where one device's credentials are written."""
        assert self._source is not None
        copy_image(self._source, temp, mode=IMAGE_MODE)

    def _check_prepared(self, disk: DiskImage) -> None:
        # Every device's rootfs partitions are byte copies of these: checked
        # here once, rather than once per device.
        checks = Checks()
        fallback = disk.ext(disk.layout.data_partition).fetch([DATA_CONF_PATH.inner])[DATA_CONF_PATH.inner][1]
        views = check_mender_confs(checks, self._rootfs_view(disk), fallback, self.options.settings,
                                   auth_key=self.options.settings.auth_key, data_from=disk)  # fmt: skip
        if self.options.enroll is not None:
            check_enroll_program(checks, self._rootfs_view(disk))
            self._server_certificate = next((v.get("ServerCertificate").value for v in views
                                             if v.get("ServerCertificate").value), None)  # fmt: skip
        if checks.failures:
            failed = checks.failures[0]
            raise ImageprovError(f"the prepared image fails '{failed.name}': {failed.detail}")

    # -- per device -----------------------------------------------------------

    def run(self, device_ids: Iterable[str]) -> Generator[Outcome, None, None]:
        """Stamp each device, yielding outcomes in the order of ``device_ids``.

        The registry and the CA are used from this thread only; building and
        publishing images (copies, debugfs, fsync: all waiting on the kernel)
        runs on ``workers`` threads, so one device's disk writes overlap the
        next one's work.
        """
        self.prepare()
        device_ids = list(device_ids)
        # What the registry holds for the batch, asked once rather than once per device: a rerun of
        # thousands of delivered devices, or a new batch, costs a query per 500 ids (Registry.live_of).
        self._live_at_start = self.registry.live_of(device_ids, kind=self.options.kind)
        workers = max(1, self.options.workers)
        queue: deque[Outcome | tuple[_Job, Future[None]]] = deque()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imageprov-build") as pool:
            try:
                for device_id in device_ids:
                    try:
                        job = self._begin(device_id)
                    except RegistryUnavailable:
                        # No certificate can be issued or delivered without it: stop here.
                        while queue:
                            yield self._finish_first(queue)
                        raise
                    except (ImageprovError, OSError) as exc:
                        queue.append(Failed(device_id, _message(exc)))
                    else:
                        queue.append(job if isinstance(job, Stamped) else (job, pool.submit(self._build, job)))
                    while len(queue) > workers:
                        yield self._finish_first(queue)
                while queue:
                    yield self._finish_first(queue)
            except BaseException:
                # Interrupted (Ctrl-C, or the caller stopped): images not yet
                # published never will be, and their certificates are revoked;
                # the registry then says exactly what the output directory holds.
                self._cancel(pool, queue)
                raise

    def _cancel(self, pool: ThreadPoolExecutor, queue: deque[Outcome | tuple[_Job, Future[None]]]) -> None:
        self.delivered |= {item.device_id for item in queue if isinstance(item, Stamped)}
        for job in self._open.values():
            if job is not None:
                job.gate.cancel()
        # Workers finish or drop what they hold; the gates say what was published.
        pool.shutdown(wait=True, cancel_futures=True)
        for device_id, job in self._open.items():
            if job is not None and job.gate.published:
                self.registry.deliver(job.issued.serial_hex, str(job.final))
                self.delivered.add(device_id)
                continue
            # Also a certificate issued just before the interrupt, whose job was never made.
            live = self.registry.live(device_id, kind=self.options.kind)
            if live is not None and live.status is Status.PENDING and self.registry.owns(live):
                self.registry.revoke(serial=live.serial, reason=Reason.CESSATION_OF_OPERATION)
        self._open.clear()

    def stamp(self, device_id: str) -> Stamped:
        """Stamp one device; raise on failure."""
        [outcome] = self.run([device_id])
        if isinstance(outcome, Failed):
            raise ImageprovError(outcome.error)
        return outcome

    def _begin(self, device_id: str) -> _Job | Stamped:
        """Registry side of a device, before its image is built: issue a pending certificate."""
        started = time.perf_counter()
        final = output_path(self.golden, self.out_dir, device_id, self.options.compress)
        notes = []
        if final.exists():
            done = self._already_delivered(device_id, final, started)
            if isinstance(done, Stamped):
                return done
            notes.append(f"{done} {self._move_aside(device_id, final)}; stamping a new image")
        notes += self._revoke_undelivered(device_id)
        self._open[device_id] = None
        issued, more = self._issue_credential(device_id)
        job = self._open[device_id] = _Job(device_id, final, issued, started, (*notes, *more))
        return job

    def _issue_credential(self, device_id: str) -> tuple[Issued, list[str]]:
        """Issue the device's certificate, or (enrolling) its bootstrap certificate, and record it pending.

        A device holds one kind of credential: one of the other kind still
        live belongs to an image or card made the other way. ``--reissue``
        revokes it (superseded) once the new one is recorded; otherwise the
        device is refused, as for a second certificate of the same kind.
        """
        options = self.options
        other = Kind.DEVICE if options.kind is Kind.BOOTSTRAP else Kind.BOOTSTRAP
        held = self.registry.live(device_id, kind=other)
        if held is not None:
            if not options.reissue:
                raise PkiError(
                    f"device {device_id} already has a {other.value} certificate ({held.status.value}, "
                    f"serial {held.serial})",
                    hint=f"pass --reissue to revoke it as superseded and issue a {options.kind.value} certificate",
                )
            if held.status is Status.PENDING and self.registry.owner_alive(held):
                raise self.registry.busy(held)
        issue = self.ca.issue_bootstrap if options.kind is Kind.BOOTSTRAP else self.ca.issue_device
        issued = issue(device_id, days=options.days, curve=options.curve)
        # Nothing live at the batch's start: a certificate there now is another station's, taken meanwhile.
        seen_free = self._live_at_start is not None and device_id not in self._live_at_start
        self.registry.record(
            issued, kind=options.kind.value, status=Status.PENDING, reissue=options.reissue, seen_free=seen_free
        )
        if held is None:
            return issued, []
        try:
            self.registry.revoke(serial=held.serial, reason=Reason.SUPERSEDED)
        except BaseException:
            # The new one must not stay live beside the old one, nor pending with no image or card to hold it.
            self.registry.revoke(serial=issued.serial_hex, reason=Reason.CESSATION_OF_OPERATION)
            raise
        return issued, [f"revoked {other.value} certificate {held.serial} (superseded)"]

    def _move_aside(self, device_id: str, final: Path) -> str:
        """Move an image that is not delivered (and its bmap) into OUT/superseded/; say where."""
        aside = self.out_dir / SUPERSEDED
        aside.mkdir(mode=0o700, exist_ok=True)
        paths = (final, final.parent / f"{device_id}.bmap")
        prefix = when = time.strftime("%Y%m%dT%H%M%S")
        for n in range(2, 1000):
            # rename(2) replaces silently: never over another image moved aside in the same second.
            if not any((aside / f"{prefix}-{path.name}").exists() for path in paths):
                break
            prefix = f"{when}.{n}"
        moved = []
        for path in paths:
            if path.exists():
                target = aside / f"{prefix}-{path.name}"
                os.rename(path, target)
                moved.append(target)
        return f"moved it to {moved[0]}"

    def _build(self, job: _Job) -> None:
        """Worker side: build, check and publish the image (no registry, no CA key here)."""
        kind = self.options.compress
        image = job.final.with_name(job.final.name.removesuffix(kind.suffix)) if kind else job.final
        temp = stage(image)
        packed: Path | None = None
        bmap_temp: Path | None = None
        try:
            self._write_and_check(temp, job.device_id, job.issued)
            if self.options.bmap:
                bmap_temp = stage(job.final.parent / f"{job.device_id}.bmap")
                bmap_temp.write_bytes(bmap_for(temp, self.disk.layout))
                bmap_temp.chmod(0o644)
            if kind is not None:
                packed = stage(job.final)
                compress(temp, packed, kind)
            with job.gate.lock:
                if job.gate.cancelled:
                    raise _Cancelled(job.device_id)
                if bmap_temp is not None:
                    # The map goes out first, so that a published image always has one beside it.
                    publish(bmap_temp, job.final.parent / f"{job.device_id}.bmap", replace=True)
                publish(packed or temp, job.final)
                job.gate.published = True
        finally:
            for leftover in (temp, packed, bmap_temp):
                if leftover is not None:
                    leftover.unlink(missing_ok=True)

    def _write_and_check(self, temp: Path, device_id: str, issued: Issued) -> None:
        if self.options.engine is Engine.MENDER_ARTIFACT:
            assert self._source is not None
            mender_artifact.stamp(
                self._source, temp, issued, self.options.settings, data_conf=self._conf_target is ConfTarget.DATA
            )
            # mender_artifact.stamp writes the key and certificate; the device id goes in the same way.
            with tempfile.TemporaryDirectory(prefix="imageprov-ma-") as tmp:
                local = Path(tmp, "device-id")
                local.write_bytes(device_id_text(device_id))
                mender_artifact.install(local, temp, DEVICE_ID_FILE, 0o644)
            report = verify_image(temp, self.ca.cert, device_id=device_id, overrides=self.options.overrides,
                                  auth_key=self.options.settings.auth_key)  # fmt: skip
            failures = report.failures
        else:
            assert self._plan is not None
            self._copy_for_device(temp)
            disk = self.disk.at(temp)
            data = disk.layout.data_partition
            enrollment = self.options.enroll
            files = (
                enrolling_files(device_id, issued, enrollment, self.ca, self._server_certificate)
                if enrollment is not None
                else device_files(device_id, issued)
            )
            disk.ext(data).apply(self._plan, files)
            checks = Checks()
            expected = {f.path: f.content for f in files}
            check_data_partition(checks, disk, self.ca.cert, device_id=device_id, expected=expected)
            check_fsck(checks, temp, [data])
            failures = checks.failures
        if failures:
            # Every failed check is named: one fault often fails several, and the user needs all of them.
            first, others = failures[0], ", ".join(f"'{c.name}'" for c in failures[1:])
            detail = f": {first.detail}" if first.detail else ""
            also = f" (also {others})" if others else ""
            raise ImageprovError(f"the stamped image fails '{first.name}'{detail}{also}")

    def _finish_first(self, queue: deque[Outcome | tuple[_Job, Future[None]]]) -> Outcome:
        # Taken off the queue only once finished: an interrupt while waiting
        # leaves it there for _cancel.
        outcome = self._finish(queue[0])
        queue.popleft()
        return outcome

    def _finish(self, item: Outcome | tuple[_Job, Future[None]]) -> Outcome:
        if not isinstance(item, tuple):
            if isinstance(item, Stamped):
                self.delivered.add(item.device_id)
            return item
        job, built = item
        try:
            built.result()
        except Exception as exc:
            # The certificate will never reach a device: it must not stay live.
            self.registry.revoke(serial=job.issued.serial_hex, reason=Reason.CESSATION_OF_OPERATION)
            self._open.pop(job.device_id, None)
            if not isinstance(exc, (ImageprovError, OSError)):
                raise
            return Failed(job.device_id, _message(exc))
        try:
            self.registry.deliver(job.issued.serial_hex, str(job.final))
        except RegistryUnavailable as exc:
            # No answer: the delivery may have been recorded all the same (the server committed, then stopped
            # or lost the connection). Removing the image could leave a live certificate that no image holds;
            # kept, it is settled by the rerun, which finds it complete under its certificate, pending or not.
            self._open.pop(job.device_id, None)
            return Failed(job.device_id, f"{_message(exc)}; whether the registry recorded it delivered is not "
                          f"known: {job.final.name} is kept for the rerun to settle")  # fmt: skip
        except ImageprovError as exc:
            # Refused (revoked meanwhile): never leave the image under its final name.
            job.final.unlink(missing_ok=True)
            self._open.pop(job.device_id, None)
            return Failed(job.device_id, _message(exc))
        self.delivered.add(job.device_id)
        self._open.pop(job.device_id, None)
        issued = job.issued
        seconds = time.perf_counter() - job.started
        return Stamped(job.device_id, job.final, issued.serial_hex, issued.fingerprint, "stamped", seconds, job.notes)

    def _already_delivered(self, device_id: str, final: Path, started: float) -> Stamped | str:
        """The existing image if it is delivered under the device's live certificate, else why it is not."""
        live = self._live_at_start.get(device_id) if self._live_at_start is not None else None
        if live is None or live.status is not Status.ACTIVE:
            live = self.registry.live(device_id, kind=self.options.kind)  # anything but a delivery: asked again
        if self.options.compress is not None:
            # A compressed image cannot be read in place: the registry's word is taken.
            if live is None:
                return f"{final.name} exists, but the device has no live certificate (revoked or unknown):"
            serial, fingerprint = live.serial, live.fingerprint
        else:
            try:
                where = (BOOTSTRAP_CERT if self.options.enroll is not None else CERT_PATH).inner
                found = self.disk.at(final).ext(self.disk.layout.data_partition).fetch([where])
                cert = x509.load_pem_x509_certificate(found[where][1] or b"")
                serial, fingerprint = f"{cert.serial_number:x}", cert.fingerprint(hashes.SHA256()).hex()
                holds = f"{final.name} holds certificate {serial}"
            except (ImageprovError, ValueError):
                serial, fingerprint, holds = "", "", f"{final.name} holds no readable certificate"
            if live is None:
                return f"{holds}, which is revoked or unknown to the registry:" if serial else f"{holds}:"
            if live.serial != serial:
                if live.status is Status.ACTIVE and not self.options.reissue:
                    # Another image holds the live certificate: revoking it is the user's call.
                    raise ImageprovError(
                        f"{holds}, but the device's live certificate is {live.serial} "
                        f"(delivered to {live.delivered_to})",
                        hint="pass --reissue to revoke it and stamp a new image, or move this image away",
                    )
                return f"{holds}, not the device's live one:"
        if self.options.reissue:
            return f"--reissue: {final.name}'s certificate {serial} is revoked as superseded;"
        notes = []
        if live.status is Status.PENDING:
            # Stopped between publishing the image and recording it: the image is complete.
            self.registry.deliver(serial, str(final))
            notes.append("marked delivered: the previous run stopped after publishing the image")
        seconds = time.perf_counter() - started
        return Stamped(device_id, final, serial, fingerprint, "already-delivered", seconds, tuple(notes))

    def _revoke_undelivered(self, device_id: str) -> list[str]:
        if self._live_at_start is not None and device_id not in self._live_at_start:
            # Nothing live at the start: a certificate issued since is another station's, alive or not, and
            # the registry's unique index refuses a second one when this one is recorded.
            return []
        # Only once the station that issued it has lost its lease (raises while it holds it).
        gone = self.registry.revoke_abandoned(device_id, kind=self.options.kind)
        if gone is None:
            return []
        return [f"revoked certificate {gone.serial}, issued by a run that is gone ({gone.owner}), never delivered"]


def _message(exc: BaseException) -> str:
    if isinstance(exc, ImageprovError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc.strerror or exc)
    return str(exc)
