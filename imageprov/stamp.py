"""The stamping pipeline: one complete, checked image per device.

What is the same for every device (mender.conf on both rootfs partitions, or
the data partition's fallback config) is done once per batch, on a private
copy of the golden image (``prepare``). Per device, that copy is copied again
(reflink or sparse), the device's key and certificate are written into the
data partition, everything is verified, and only then does the image get its
final name. The golden image is only ever opened read-only.

Registry states make reruns safe: a certificate is ``pending`` from issue
until its image has its final name, then ``active``. On a rerun, a device
whose image exists is left as it is (a pending certificate that matches its
image becomes active); a pending certificate whose image never got its final
name is revoked (``superseded``) and a new one is issued.
"""

from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from imageprov import mender_artifact
from imageprov.copy import copy_image, staged
from imageprov.errors import ImageprovError, UsageError
from imageprov.ext4 import NewFile
from imageprov.image import DiskImage
from imageprov.layout import Overrides, Volume
from imageprov.menderconf import DATA_CONF, ROOTFS_CONF, Settings, merge, parse
from imageprov.pki import CertificateAuthority, Curve, Issued
from imageprov.registry import Reason, Registry, Status
from imageprov.verify import CERT_PATH, DATA_CONF_PATH, KEY_PATH, ROOTFS_CONF_PATH, verify_image

# A stamped image holds the device's private key: readable by its owner only.
IMAGE_MODE = 0o600


class ConfTarget(enum.Enum):
    ROOTFS = "rootfs"  # /etc/mender/mender.conf on both rootfs partitions
    DATA = "data"  # the fallback config on the data partition: rootfs stay byte-identical


class Engine(enum.Enum):
    DEBUGFS = "debugfs"
    MENDER_ARTIFACT = "mender-artifact"


@dataclass(frozen=True)
class StampOptions:
    settings: Settings = field(default_factory=Settings)
    conf_target: ConfTarget = ConfTarget.ROOTFS
    engine: Engine = Engine.DEBUGFS
    days: int = 3650
    curve: Curve = Curve.P256
    reissue: bool = False
    overrides: Overrides = field(default_factory=Overrides)


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
class Prepared:
    """The batch's source image and what preparing it did."""

    source: Path
    notes: tuple[str, ...] = field(default=())


def output_path(golden: Path, out_dir: Path, device_id: str) -> Path:
    """``OUT_DIR/<ID><golden's suffix>``, e.g. dev-0001.sdimg."""
    return out_dir / f"{device_id}{golden.suffix or '.img'}"


def check_outputs(golden: Path, out_dir: Path, device_ids: list[str]) -> None:
    """Refuse an output directory that is not one, or an output that would be the golden image."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out_dir} is not writable")
    for device_id in device_ids:
        target = output_path(golden, out_dir, device_id)
        if target.exists() and os.path.samefile(target, golden):
            raise UsageError(f"the output for {device_id} would overwrite the golden image {golden}",
                             hint="choose another --out directory")  # fmt: skip


# A partition, files to write on it and directories to make.
Change = tuple[Volume, list[NewFile], list[PurePosixPath]]


class Batch:
    """Stamp many devices from one golden image. Use as a context manager."""

    def __init__(
        self, golden: Path, out_dir: Path, ca: CertificateAuthority, registry: Registry, options: StampOptions
    ) -> None:
        self.golden = golden
        self.out_dir = out_dir
        self.ca = ca
        self.registry = registry
        self.options = options
        self.disk = DiskImage.open(golden, options.overrides)
        self._prepared: Prepared | None = None
        self._scratch: Path | None = None

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._scratch is not None:
            self._scratch.unlink(missing_ok=True)

    def prepare(self) -> Prepared:
        """Do what is the same for every device, once: on a private copy, or not at all if already done."""
        if self._prepared is not None:
            return self._prepared
        if self.options.engine is Engine.MENDER_ARTIFACT:
            self._prepared = Prepared(self.golden)
            return self._prepared
        changes, notes = self._batch_changes(self.disk)
        if not changes:
            self._prepared = Prepared(self.golden, (*notes, "golden image already prepared: copying it as it is"))
            return self._prepared
        scratch = self.out_dir / f".imageprov-batch-{os.getpid()}.partial{self.golden.suffix}"
        self._scratch = scratch
        copy_image(self.golden, scratch, mode=IMAGE_MODE)
        prepared = self.disk.at(scratch)
        for volume, files, dirs in changes:
            prepared.ext(volume).write_files(files, dirs=dirs)
        self._prepared = Prepared(scratch, tuple(notes))
        return self._prepared

    def _batch_changes(self, disk: DiskImage) -> tuple[list[Change], list[str]]:
        """The writes every device's image needs, and notes for the user; none if the golden is prepared."""
        settings, layout = self.options.settings, disk.layout
        notes: list[str] = []
        changes: list[Change] = []
        mender_dir = PurePosixPath("/mender")
        data_fs = disk.ext(layout.data_partition)
        if self.options.conf_target is ConfTarget.ROOTFS:
            for volume in layout.rootfs_partitions:
                where = f"{ROOTFS_CONF} on {volume.role.value}"
                current = disk.ext(volume).read(ROOTFS_CONF_PATH)
                merged = merge(current, settings, where)
                if merged.replaced is not None:
                    notes.append(f"{where}: replaced HttpsClient {merged.replaced}")
                if merged.changed:
                    changes.append((volume, [NewFile(ROOTFS_CONF_PATH, merged.text, 0o644)], []))
        else:
            for volume in layout.rootfs_partitions:
                where = f"{ROOTFS_CONF} on {volume.role.value}"
                main = parse(disk.ext(volume).read(ROOTFS_CONF_PATH), where)
                if "HttpsClient" in main and main["HttpsClient"] != settings.https_client:
                    raise UsageError(f"{where} has its own HttpsClient, which overrides the data partition's",
                                     hint="use --conf-target rootfs, or remove it from the golden image")  # fmt: skip
            inode, fallback = data_fs.fetch([DATA_CONF_PATH.inner])[DATA_CONF_PATH.inner]
            merged = merge(fallback, settings, DATA_CONF)
            if merged.replaced is not None:
                notes.append(f"{DATA_CONF}: replaced HttpsClient {merged.replaced}")
            if merged.changed or inode is None:
                changes.append((layout.data_partition, [NewFile(DATA_CONF_PATH.inner, merged.text, 0o644)], []))
        if data_fs.stat(mender_dir) is None:
            # Made once here rather than once per device.
            changes.append((layout.data_partition, [], [mender_dir]))
        return changes, notes

    def stamp(self, device_id: str) -> Stamped:
        """Deliver one device's image, or leave an already delivered one as it is."""
        started = time.perf_counter()
        final = output_path(self.golden, self.out_dir, device_id)
        if final.exists():
            return self._already_delivered(device_id, final, started)
        notes = self._revoke_undelivered(device_id)
        issued = self.ca.issue_device(device_id, days=self.options.days, curve=self.options.curve)
        self.registry.record(issued, status=Status.PENDING, reissue=self.options.reissue)
        try:
            with staged(final) as temp:
                self._write(temp, issued)
                report = verify_image(temp, self.ca.cert, device_id=device_id, overrides=self.options.overrides,
                                      fsck_rootfs=False)  # fmt: skip
                if not report.ok:
                    failed = report.failures[0]
                    raise ImageprovError(f"the stamped image fails '{failed.name}': {failed.detail}")
        except BaseException:
            # The certificate will never reach a device: it must not stay live.
            self.registry.revoke(serial=issued.serial_hex, reason=Reason.CESSATION_OF_OPERATION)
            raise
        self.registry.deliver(issued.serial_hex, str(final))
        seconds = time.perf_counter() - started
        return Stamped(device_id, final, issued.serial_hex, issued.fingerprint, "stamped", seconds, tuple(notes))

    def _write(self, temp: Path, issued: Issued) -> None:
        settings, target = self.options.settings, self.options.conf_target
        if self.options.engine is Engine.MENDER_ARTIFACT:
            mender_artifact.stamp(self.golden, temp, issued, settings, data_conf=target is ConfTarget.DATA)
            return
        copy_image(self.prepare().source, temp, mode=IMAGE_MODE)
        files = [NewFile(KEY_PATH.inner, issued.key_pem(), 0o600), NewFile(CERT_PATH.inner, issued.cert_pem(), 0o644)]
        self.disk.at(temp).ext(self.disk.layout.data_partition).write_files(files)

    def _already_delivered(self, device_id: str, final: Path, started: float) -> Stamped:
        found = self.disk.at(final).ext(self.disk.layout.data_partition).fetch([CERT_PATH.inner])
        pem = found[CERT_PATH.inner][1]
        if pem is None:
            raise ImageprovError(f"{final} exists but holds no certificate", hint="move it away to stamp it again")
        cert = x509.load_pem_x509_certificate(pem)
        serial = f"{cert.serial_number:x}"
        notes = []
        live = self.registry.live(device_id)
        if live is not None and live.serial == serial and live.status is Status.PENDING:
            # Interrupted between the rename and the registry update: the image is complete.
            self.registry.deliver(serial, str(final))
            notes.append("marked delivered: the previous run stopped after writing the image")
        elif live is None or live.serial != serial:
            notes.append("warning: this image's certificate is not the device's live certificate in the registry")
        fingerprint = cert.fingerprint(hashes.SHA256()).hex()
        return Stamped(device_id, final, serial, fingerprint, "already-delivered", time.perf_counter() - started,
                       tuple(notes))  # fmt: skip

    def _revoke_undelivered(self, device_id: str) -> list[str]:
        live = self.registry.live(device_id)
        if live is None or live.status is not Status.PENDING:
            return []
        self.registry.revoke(serial=live.serial, reason=Reason.SUPERSEDED)
        return [f"revoked certificate {live.serial}, issued by an interrupted run for an image never delivered"]
