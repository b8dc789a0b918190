"""Proof that an image is right before it is flashed: every check that the device and the edge will make.

``stamp`` runs these on every image before it gets its final name, and
``imageprov verify`` runs them on any image. Each check is listed, passed or
failed, so that a report shows everything that is wrong at once.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtensionOID, NameOID

from imageprov.disk.ext4 import Ext4, Inode, fsck
from imageprov.disk.image import Area, DevicePath, DiskImage
from imageprov.disk.layout import Overrides, Volume
from imageprov.errors import ImageprovError
from imageprov.mender.conf import (
    CLIENT_CERT,
    CLIENT_KEY,
    DATA_CONF,
    ROOTFS_CONF,
    AuthKey,
    Settings,
    auth_private_key,
    effective,
    lookup,
    lookup_path,
    parse,
)
from imageprov.mender.enroll import (
    BOOTSTRAP_CERT,
    BOOTSTRAP_KEY,
    ENGINE,
    ENROLL_CONF,
    FLEET_CA,
    KEY_URI,
    PROGRAM,
    TOKEN_DIR,
    Enrollment,
    read_conf,
)
from imageprov.mender.server_ca import SERVER_CERT, certificates_in, fingerprint
from imageprov.pki.ca import bootstrap_problems, is_bootstrap
from imageprov.pki.chain import device_key_problem, extension_problem, leaf_problems, usage_problems

# The device id the line stamped, one line, for the device's identity script:
# an edge with ``--identity attribute:NAME`` wants it in id_data[NAME], equal to the CN.
DEVICE_ID_FILE = "/data/mender/imageprov-device-id"

KEY_PATH = DevicePath.parse(CLIENT_KEY)
CERT_PATH = DevicePath.parse(CLIENT_CERT)
DEVICE_ID_PATH = DevicePath.parse(DEVICE_ID_FILE)
DATA_CONF_PATH = DevicePath.parse(DATA_CONF)
SERVER_CERT_PATH = DevicePath.parse(SERVER_CERT)
ROOTFS_CONF_PATH = PurePosixPath(ROOTFS_CONF)

# meta-mender's mender-migrate-configuration installs itself as the Artifact
# state script ArtifactCommit_Enter_10_migrate-configuration
# (mender-migrate-configuration.bb; mender-client-migrate-configuration.bb
# before scarthgap): it goes into the .mender artifacts the build makes, and
# the client keeps the installed artifact's scripts in /var/lib/mender/scripts,
# that is /data/mender/scripts. A copy under /etc/mender/scripts (where the
# rootfs's own Idle/Sync/Download scripts go) shows that a build carries it too.
MIGRATE_SUFFIX = "_migrate-configuration"
ARTIFACT_SCRIPTS = DevicePath.parse("/data/mender/scripts")
ROOTFS_SCRIPTS = PurePosixPath("/etc/mender/scripts")
# The temporary file only that script writes: it finds the script under another name.
_MIGRATE_MARK = b"mender-persistent.conf"

# What the client reads that decides where it connects and with which credentials.
VIEWED = ("ServerURL", "HttpsClient.Certificate", "HttpsClient.Key", "Security.AuthPrivateKey")

# The HttpsClient block the client must use: the key in a file, or (an enrolling image) in the device's token.
FILE_CLIENT: dict[str, str | None] = {"Certificate": CLIENT_CERT, "Key": CLIENT_KEY, "SSLEngine": None}
TOKEN_CLIENT: dict[str, str | None] = {"Certificate": CLIENT_CERT, "Key": KEY_URI, "SSLEngine": ENGINE}


def client_block(settings: Settings) -> dict[str, str | None]:
    """The HttpsClient block ``settings`` write, with an absent SSLEngine as None."""
    return {"Certificate": settings.certificate, "Key": settings.key, "SSLEngine": settings.ssl_engine}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""
    # Passes, but the user must know: the device may lose it later, a stale CRL, a truncated GPT.
    # Shown, never a failure.
    warning: bool = False


@dataclass(frozen=True)
class Used:
    """A value the client uses, and the file it comes from."""

    value: str  # "" where no file sets it: the client's own default
    source: str | None  # ROOTFS_CONF or DATA_CONF; None where no file sets it

    def __str__(self) -> str:
        return f"{json.dumps(self.value, ensure_ascii=False)} from {self.source}" if self.source else "not set"


@dataclass(frozen=True)
class ClientView:
    """What the client uses from the main conf over the fallback, on one rootfs (or the data partition alone)."""

    role: str  # "rootfs-a", "rootfs-b", or "data" for a bare data partition
    fields: tuple[tuple[str, Used], ...]  # by the dotted names of VIEWED

    def get(self, name: str) -> Used:
        """What the client uses for ``name``; not set (``Used("", None)``) for an optional field absent here."""
        return dict(self.fields).get(name, Used("", None))

    def to_dict(self) -> dict[str, dict[str, str | None]]:
        return {name: {"value": used.value, "from": used.source} for name, used in self.fields}


@dataclass(frozen=True)
class Report:
    image: Path
    checks: tuple[Check, ...]
    device_id: str | None = None
    serial: str | None = None
    fingerprint: str | None = None
    client: tuple[ClientView, ...] = ()
    # "device": the device's key and certificate; "bootstrap": a bootstrap credential, enrolling at first boot.
    kind: str = "device"

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": str(self.image),
            "ok": self.ok,
            "device_id": self.device_id,
            "serial": self.serial,
            "fingerprint": self.fingerprint,
            "kind": self.kind,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail, "warning": c.warning} for c in self.checks],
            "client": {view.role: view.to_dict() for view in self.client},
        }


@dataclass
class Checks:
    """Checks as they are made, in order."""

    items: list[Check] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str = "", *, warning: bool = False) -> bool:
        self.items.append(Check(name, ok, detail, warning and ok))
        return ok

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.items if not c.ok]


@dataclass(frozen=True)
class DataFindings:
    """What the data partition holds: the certificate and the fallback mender.conf."""

    cert: x509.Certificate | None = None
    fallback: bytes | None = None
    readable: bool = True
    # The HttpsClient block the client must use: FILE_CLIENT, or TOKEN_CLIENT for an enrolling image.
    client: dict[str, str | None] = field(default_factory=lambda: dict(FILE_CLIENT))
    # An enrolling image's enroll.conf, as the device reads it.
    enroll: dict[str, str] | None = None

    @property
    def enrolling(self) -> bool:
        return self.client == TOKEN_CLIENT


def verify_image(
    image: Path,
    ca_cert: x509.Certificate,
    *,
    device_id: str | None = None,
    crl: x509.CertificateRevocationList | None = None,
    overrides: Overrides | None = None,
    fsck_rootfs: bool = True,
    now: dt.datetime | None = None,
    settings: Settings | None = None,
    strict: bool = False,
    auth_key: AuthKey = AuthKey.CERT,
) -> Report:
    """Check everything about the client credentials in ``image``; never raises for a bad image.

    ``settings``, when given, name a ServerURL or TenantToken the client must use; ``strict``
    fails what is otherwise a warning: a CRL past its nextUpdate.
    """
    checks = Checks()
    try:
        disk = DiskImage.open(image, overrides)
        volumes = disk.rootfs_volumes
    except ImageprovError as exc:
        checks.add("partition table and layout", False, str(exc))
        return Report(image, tuple(checks.items), device_id)
    data = disk.layout.data_volume
    if data is None:
        detail = "a bare root filesystem: no data partition, so no key or certificate to check"
        checks.add("partition table and layout", True, detail)
        found = DataFindings()
    else:
        kind = "a bare data partition" if disk.layout.is_bare else disk.layout.table.type.name
        checks.add("partition table and layout", True, kind)
        for warning in disk.layout.table.warnings:
            checks.add("partition table", True, warning, warning=True)
        found = check_data_partition(checks, disk, ca_cert, device_id=device_id, crl=crl, now=now, strict=strict)
    if not found.readable:
        return Report(image, tuple(checks.items), device_id)
    views = check_mender_confs(checks, disk, found.fallback, settings, auth_key=auth_key, client=found.client)
    if found.enrolling:
        check_enroll_program(checks, disk)
        if found.enroll is not None:
            check_enroll_trust(checks, found.enroll, views)
    check_migrate_script(checks, disk)
    # e2fsck for the ext filesystems; a squashfs rootfs is read-only and was never written.
    touched = [v for v in (*([data] if data else ()), *(volumes if fsck_rootfs else ())) if v.filesystem.is_ext]
    check_fsck(checks, image, touched)
    cert = found.cert
    return Report(
        image,
        tuple(checks.items),
        _cn(cert) if cert else device_id,
        f"{cert.serial_number:x}" if cert else None,
        cert.fingerprint(hashes.SHA256()).hex() if cert else None,
        tuple(views),
        "bootstrap" if found.enrolling else "device",
    )


def check_data_partition(
    checks: Checks,
    disk: DiskImage,
    ca_cert: x509.Certificate,
    *,
    device_id: str | None = None,
    crl: x509.CertificateRevocationList | None = None,
    now: dt.datetime | None = None,
    expected: dict[PurePosixPath, bytes] | None = None,
    strict: bool = False,
) -> DataFindings:
    """Check the key, the certificate and the device id file on the data partition, in one debugfs run.

    ``expected``, when given, are contents just written, which must read back
    byte for byte.
    """
    wanted = [KEY_PATH.inner, CERT_PATH.inner, DEVICE_ID_PATH.inner, DATA_CONF_PATH.inner]
    enroll_paths = [BOOTSTRAP_KEY.inner, BOOTSTRAP_CERT.inner, FLEET_CA.inner, ENROLL_CONF.inner]
    try:
        found = disk.ext(disk.layout.data_partition).fetch([*wanted, *enroll_paths])
    except ImageprovError as exc:
        checks.add("data partition readable", False, str(exc))
        return DataFindings(readable=False)
    key_inode, key_pem = found[KEY_PATH.inner]
    cert_inode, cert_pem = found[CERT_PATH.inner]
    for path, want in (expected or {}).items():
        checks.add(f"{path} reads back as written", found[path][1] == want)
    enrolling = found[ENROLL_CONF.inner][0] is not None
    enroll: dict[str, str] | None = None
    if enrolling:
        cert, enroll = _check_enrolling(checks, found, ca_cert, device_id, crl, now, strict)
        # A token's store (and its PINs) from a device that enrolled, captured into a golden image: every card
        # would carry it.
        token = disk.ext(disk.layout.data_partition).stat(DevicePath.parse(TOKEN_DIR).inner)
        checks.add(f"{TOKEN_DIR} absent", token is None,
                   "a device's token store and PINs: the golden image was taken from an enrolled device" if token
                   else "")  # fmt: skip
    else:
        _check_file(checks, CLIENT_KEY, key_inode, 0o600)
        _check_file(checks, CLIENT_CERT, cert_inode, 0o644)
        cert = _check_credentials(checks, key_pem, cert_pem, ca_cert, device_id, crl, now, strict)
        if cert is not None:
            # The edge refuses a bootstrap certificate on every device path: such an image never gets in.
            checks.add("certificate is no bootstrap certificate", not is_bootstrap(cert),
                       "its certificate policies say enrollment (EST) only" if is_bootstrap(cert) else "")  # fmt: skip
    id_inode, id_text = found[DEVICE_ID_PATH.inner]
    _check_file(checks, DEVICE_ID_FILE, id_inode, 0o644)
    if cert is not None and id_inode is not None:
        # What the device's identity script sends as id_data[NAME]; the edge compares it with the CN.
        checks.add(f"{DEVICE_ID_FILE} holds the certificate's CN", id_text == device_id_text(_cn(cert)),
                   repr(id_text.decode(errors="replace")) if id_text is not None else "unreadable")  # fmt: skip
    client = dict(TOKEN_CLIENT if enrolling else FILE_CLIENT)
    return DataFindings(cert, found[DATA_CONF_PATH.inner][1], client=client, enroll=enroll)


def _check_enrolling(
    checks: Checks,
    found: dict[PurePosixPath, tuple[Inode | None, bytes | None]],
    ca_cert: x509.Certificate,
    device_id: str | None,
    crl: x509.CertificateRevocationList | None,
    now: dt.datetime | None,
    strict: bool,
) -> tuple[x509.Certificate | None, dict[str, str] | None]:
    """An image that enrolls at first boot (mender/enroll.py): its bootstrap credential, and no key of the device.

    The bootstrap certificate passes every check the device certificate
    would (nginx takes it for EST), and has the bootstrap profile; the image
    holds no key or certificate at the client's paths: the device makes its key
    in its token and writes the certificate the edge gives it.
    """
    for path, device_path in ((CLIENT_KEY, KEY_PATH), (CLIENT_CERT, CERT_PATH)):
        inode = found[device_path.inner][0]
        what = "an enrolling image holds no key or certificate there: the device makes its key in its token"
        checks.add(f"{path} absent", inode is None, what if inode is not None else "")
    for device_path, mode in ((BOOTSTRAP_KEY, 0o600), (BOOTSTRAP_CERT, 0o644), (FLEET_CA, 0o644), (ENROLL_CONF, 0o644)):
        _check_file(checks, str(device_path.device_path), found[device_path.inner][0], mode)
    key_pem, cert_pem = found[BOOTSTRAP_KEY.inner][1], found[BOOTSTRAP_CERT.inner][1]
    cert = _check_credentials(checks, key_pem, cert_pem, ca_cert, device_id, crl, now, strict)
    if cert is not None:
        problems = bootstrap_problems(cert)
        checks.add("certificate is a bootstrap certificate (enrollment only)", not problems, "; ".join(problems))
    fleet = found[FLEET_CA.inner][1]
    try:
        held = x509.load_pem_x509_certificate(fleet or b"")
        checks.add(f"{FLEET_CA.device_path} is the CA", held == ca_cert, held.subject.rfc4514_string())
    except ValueError:
        checks.add(f"{FLEET_CA.device_path} is the CA", False, "not a PEM certificate")
    try:
        conf = read_conf(found[ENROLL_CONF.inner][1] or b"")
    except ImageprovError as exc:
        checks.add(f"{ENROLL_CONF.device_path} readable", False, str(exc))
        return cert, None
    url = conf.get("EST_URL", "")
    checks.add("enrollment URL is https", url.startswith("https://"), url)
    checks.add("enrollment key is the one the client loads", conf.get("KEY_URI") == KEY_URI, conf.get("KEY_URI", ""))
    if cert is not None:
        named = conf.get("DEVICE_ID", "")
        checks.add(f"{ENROLL_CONF.device_path} names the certificate's CN", named == _cn(cert), named)
        # Every other line as imageprov writes it: paths, labels and URI that agree with each other and with
        # mender.conf (the device refuses a conf that misses one).
        try:
            # EST_URL is checked above: any https URL is the site's.
            placeholder = Enrollment("https://edge.invalid/.well-known/est")
            expected = read_conf(placeholder.conf(named, conf.get("SERVER_CA") or None))
        except ImageprovError:  # a CN enroll.conf cannot hold: refused above already, by the device id check
            expected = {}
        differ = sorted(k for k in expected.keys() | conf.keys() if expected.get(k) != conf.get(k) and k != "EST_URL")
        checks.add(f"{ENROLL_CONF.device_path} as imageprov writes it", bool(expected) and not differ,
                   ", ".join(f"{k}={conf.get(k, '(none)')}" for k in differ))  # fmt: skip
    return cert, conf


def check_enroll_program(checks: Checks, disk: DiskImage) -> None:
    """Each populated rootfs holds the program that enrolls the device (the layer's, IMAGEPROV_ENROLL): else the
    device never gets its key or certificate, and its client never starts."""
    for volume in disk.rootfs_volumes:
        name = f"{PROGRAM} on {volume.role.value}"
        try:
            content = disk.read_files(volume, [PurePosixPath(PROGRAM)])[PurePosixPath(PROGRAM)]
        except ImageprovError as exc:
            checks.add(name, False, str(exc))
            continue
        checks.add(name, content is not None,
                   "" if content is not None else "missing: build the image with IMAGEPROV_ENROLL = \"1\"")  # fmt: skip


def check_enroll_trust(checks: Checks, conf: dict[str, str], views: list[ClientView]) -> None:
    """enroll.conf's SERVER_CA is the ServerCertificate the client uses: both talk to the same edge."""
    for view in views:
        used = view.get("ServerCertificate").value
        checks.add(f"enrollment trusts the edge as the client does ({view.role})", conf.get("SERVER_CA", "") == used,
                   f"SERVER_CA={conf.get('SERVER_CA', '')!r}, ServerCertificate={used!r}")  # fmt: skip


def device_id_text(device_id: str) -> bytes:
    """What :data:`DEVICE_ID_FILE` holds: the device id and a newline."""
    return f"{device_id}\n".encode()


def check_mender_confs(
    checks: Checks,
    disk: DiskImage,
    fallback: bytes | None,
    settings: Settings | None = None,
    *,
    auth_key: AuthKey = AuthKey.CERT,
    data_from: DiskImage | None = None,
    client: dict[str, str | None] | None = None,
) -> list[ClientView]:
    """Check the configuration the client will use when booted from rootfs A and from rootfs B.

    That is the rootfs's /etc/mender/mender.conf over the data partition's
    fallback, field by field, keys matched as the client matches them
    (:func:`imageprov.mender.conf.effective`). An empty rootfs B is not
    checked: the first update brings its root filesystem. Returns what the
    client uses on each rootfs whose confs could be read. The data partition's
    files are read from ``data_from`` if given (flash's batch copy holds the
    data partition alone; its rootfs partitions are the golden image's).
    """
    if disk.rootfs_b_empty:
        checks.add("rootfs B", True, "empty: it receives its root filesystem and mender.conf from the first update")
    views: list[ClientView] = []
    volumes = disk.rootfs_volumes
    if not volumes:  # a bare data partition: its fallback is all there is to see
        views += _check_conf(checks, "mender.conf on the data partition", None, fallback, settings, bare_data=True,
                             auth_key=auth_key, client=client)  # fmt: skip
    for volume in volumes:
        try:
            main = disk.read_files(volume, [ROOTFS_CONF_PATH])[ROOTFS_CONF_PATH]
        except ImageprovError as exc:
            checks.add(f"mender.conf on {volume.role.value}", False, str(exc))
            continue
        views += _check_conf(checks, f"mender.conf on {volume.role.value}", main, fallback, settings,
                             bare_data=False, role=volume.role.value, auth_key=auth_key, client=client)  # fmt: skip
    for view in views:
        rootfs = next((v for v in volumes if v.role.value == view.role), None)
        _check_server_certificate(checks, disk, data_from or disk, view, rootfs, settings)
    return views


def _check_server_certificate(
    checks: Checks,
    disk: DiskImage,
    data_disk: DiskImage,
    view: ClientView,
    rootfs: Volume | None,
    settings: Settings | None,
) -> None:
    """The file ServerCertificate names exists in the image and, with ``settings.server_ca``, holds those.

    The client trusts that file besides the system store; where it is missing
    the client only logs a warning and the edge's certificate fails to verify
    at the first connection, on the device: so a missing file is a failure here.
    """
    suffix = f" ({view.role})" if rootfs is not None else ""
    name = f"server certificate the client trusts{suffix}"
    wanted = settings.server_ca if settings is not None else None
    used = view.get("ServerCertificate")
    if not used.value:
        if wanted is not None:
            checks.add(name, False, "no ServerCertificate in the configuration the client uses")
        return
    where = DevicePath.parse(used.value)
    try:
        if where.area is Area.DATA and data_disk.layout.data_volume is not None:
            inode, content = data_disk.ext(data_disk.layout.data_volume).fetch([where.inner])[where.inner]
        elif where.area is Area.ROOTFS and rootfs is not None:
            content = disk.read_files(rootfs, [where.inner])[where.inner]
            inode = None
        else:
            checks.add(name, True, f"ServerCertificate {used}: not on a partition imageprov reads, not checked",
                       warning=True)  # fmt: skip
            return
    except ImageprovError as exc:
        checks.add(name, False, f"ServerCertificate {used}: {exc}")
        return
    if content is None:
        kind = f"a {inode.kind}, not a file" if inode is not None else "missing"
        checks.add(name, False, f"ServerCertificate {used}: {used.value} is {kind} in the image")
        return
    found = certificates_in(content)
    if not found:
        checks.add(name, False, f"ServerCertificate {used}: {used.value} holds no PEM certificate")
        return
    held = {fingerprint(cert) for cert in found}
    subjects = ", ".join(cert.subject.rfc4514_string() for cert in found)
    if wanted is None:
        checks.add(name, True, f"ServerCertificate {used}: {subjects}")
        return
    missing = [s for f, s in zip(wanted.fingerprints, wanted.subjects, strict=True) if f not in held]
    checks.add(name, not missing,
               f"ServerCertificate {used}: " + (f"lacks {', '.join(missing)}" if missing else subjects))  # fmt: skip


def migrate_scripts(disk: DiskImage) -> list[str]:
    """Where the image holds meta-mender's migrate-configuration state script, as device paths."""
    places: list[tuple[Volume, PurePosixPath, str]] = []
    if disk.layout.data_volume is not None:
        places.append((disk.layout.data_volume, ARTIFACT_SCRIPTS.inner, str(ARTIFACT_SCRIPTS.device_path)))
    places += [(volume, ROOTFS_SCRIPTS, f"{ROOTFS_SCRIPTS} on {volume.role.value}") for volume in disk.rootfs_volumes]
    found = []
    for volume, directory, shown in places:
        try:
            fs = disk.ext(volume)
            inode = fs.stat(directory)
            if inode is None or inode.kind != "directory":
                continue
            names = [entry.name for entry in fs.listdir(directory) if not entry.is_dir]
            contents = fs.fetch([directory / name for name in names])
        except ImageprovError:
            # A partition imageprov cannot read (a squashfs rootfs, a damaged
            # filesystem) is reported by the checks that need it; the others are still looked at.
            continue
        for name in names:
            content = contents[directory / name][1] or b""
            if name.endswith(MIGRATE_SUFFIX) or _MIGRATE_MARK in content:
                found.append(f"{shown}/{name}")
    return found


def migrate_warning(found: list[str]) -> str:
    """What the migrate-configuration script found at ``found`` does to the credentials, and what to do."""
    return (f"{', '.join(found)}: meta-mender's mender-migrate-configuration, at the ArtifactCommit of an update "
            f"that carries it, rewrites {DATA_CONF} keeping only RootfsPartA/B: HttpsClient and Security there are "
            f"lost; build them into every update's {ROOTFS_CONF}, or remove mender-migrate-configuration "
            "from the build")  # fmt: skip


def check_migrate_script(checks: Checks, disk: DiskImage) -> None:
    """Warn where the image holds the state script that drops our blocks from the data partition's conf."""
    found = migrate_scripts(disk)
    if found:
        checks.add("mender-migrate-configuration state script", True, migrate_warning(found), warning=True)


def check_fsck(checks: Checks, image: Path, volumes: list[Volume]) -> None:
    """``e2fsck -fn`` on each volume: read-only, and it must find nothing to fix."""
    for volume in volumes:
        _check_fsck(checks, image, volume)


def _check_file(checks: Checks, path: str, inode: Inode | None, mode: int) -> None:
    if inode is None:
        checks.add(f"{path} present", False, "missing")
        return
    checks.add(f"{path} present", inode.kind == "regular", inode.kind)
    checks.add(
        f"{path} is 0{mode:o} root:root",
        (inode.mode, inode.uid, inode.gid) == (mode, 0, 0),
        f"0{inode.mode:o} {inode.uid}:{inode.gid}",
    )


def _check_credentials(
    checks: Checks,
    key_pem: bytes | None,
    cert_pem: bytes | None,
    ca_cert: x509.Certificate,
    device_id: str | None,
    crl: x509.CertificateRevocationList | None,
    now: dt.datetime | None,
    strict: bool = False,
) -> x509.Certificate | None:
    """Check a certificate and its key as the edge and OpenSSL will. A bootstrap certificate's critical policy
    is left to the caller's check of its profile (it is one for an enrolling image, and wrong in any other)."""
    if cert_pem is None:
        return None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        checks.add("certificate parses", False, "not a PEM certificate")
        return None
    try:
        cert.verify_directly_issued_by(ca_cert)
        checks.add("certificate signed by the CA", True, ca_cert.subject.rfc4514_string())
    except (ValueError, TypeError, InvalidSignature) as exc:
        checks.add("certificate signed by the CA", False, str(exc) or "signature does not verify")
    # What nginx refuses besides a bad signature: a CA that may not sign certificates, and the like.
    policies = frozenset({ExtensionOID.CERTIFICATE_POLICIES}) if is_bootstrap(cert) else frozenset()
    refused = leaf_problems(cert, ca_cert, now=now, processed=policies)
    checks.add("chain passes OpenSSL's checks", not refused, "; ".join(refused))
    moment = now or dt.datetime.now(dt.UTC)
    checks.add(
        "certificate within its validity",
        cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc,
        f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}",
    )
    if crl is not None:
        signed = crl.is_signature_valid(ca_cert.public_key())  # type: ignore[arg-type]
        revoked = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
        checks.add("CRL signed by the CA", signed)
        next_update = crl.next_update_utc
        if next_update is not None and moment > next_update:
            # nginx (ssl_crl) refuses every client certificate once the CRL has expired.
            stale = f"its nextUpdate was {next_update:%Y-%m-%d %H:%M} UTC: the edge refuses every device with it"
            checks.add("CRL is current", not strict, stale, warning=True)
        checks.add("certificate not revoked", revoked is None,
                   f"revoked {revoked.revocation_date_utc:%Y-%m-%d}" if revoked else "")  # fmt: skip
    if device_id is not None:
        checks.add("certificate CN is the device id", _cn(cert) == device_id, _cn(cert))
    # The same rules as the edge's (pki/chain.py): an absent extendedKeyUsage
    # restricts nothing, anyExtendedKeyUsage alone does not do.
    unreadable = extension_problem(cert)
    usage = [unreadable] if unreadable is not None else usage_problems(cert)
    checks.add("certificate allows TLS client use", not usage, "; ".join(usage))
    weak = device_key_problem(cert.public_key())
    checks.add("certificate key is one Mender takes", weak is None, weak or "")
    if key_pem is not None:
        try:
            key = serialization.load_pem_private_key(key_pem, None)
            checks.add("key matches the certificate", key.public_key() == cert.public_key())
        except (ValueError, TypeError):
            checks.add("key matches the certificate", False, "the key is not an unencrypted PEM private key")
    return cert


def _cn(cert: x509.Certificate) -> str:
    found = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(found[0].value) if found else ""


def _check_conf(
    checks: Checks,
    name: str,
    main_text: bytes | None,
    fallback: bytes | None,
    settings: Settings | None,
    *,
    bare_data: bool,
    role: str = "",
    auth_key: AuthKey = AuthKey.CERT,
    client: dict[str, str | None] | None = None,
) -> list[ClientView]:
    # What the client must use: given, or what ``settings`` write, or the key in a file.
    wanted = client or (client_block(settings) if settings is not None else FILE_CLIENT)
    try:
        main = parse(main_text, f"{ROOTFS_CONF} on {role}") if main_text is not None else {}
        extra = parse(fallback, DATA_CONF) if fallback is not None else {}
    except ImageprovError as exc:
        checks.add(name, False, str(exc))
        return []
    suffix = f" ({role})" if role else ""
    fields = [(path, _used(main, extra, path)) for path in VIEWED]
    server_certificate = _used(main, extra, "ServerCertificate")
    if server_certificate.value:
        # Shown where set only: most images trust the system store alone.
        fields.insert(1, ("ServerCertificate", server_certificate))
    view = ClientView(role or "data", tuple(fields))
    checks.add(f"configuration the client uses{suffix}", True,
               "; ".join(f"{path} {used}" for path, used in view.fields))  # fmt: skip
    used = effective(main, extra)
    if auth_key is AuthKey.CERT:
        _check_auth_key(checks, used, role, view.get("Security.AuthPrivateKey").source, wanted)
    for key, value in (
        ("ServerURL", settings and settings.server_url),
        ("TenantToken", settings and settings.tenant_token),
    ):
        if value is not None:
            source = ROOTFS_CONF if lookup(main, key) is not None else DATA_CONF
            checks.add(f"{key} the client uses{suffix}", used.get(key) == value,
                       f"{used.get(key)!r} from {source}")  # fmt: skip
    block = used.get("HttpsClient")
    # Where the client finds each field: the rootfs conf wins, field by field.
    where = ROOTFS_CONF if any(lookup_path(main, f"HttpsClient.{k}") is not None for k in wanted) else DATA_CONF
    if not isinstance(block, dict):
        checks.add(name, False, "no HttpsClient block")
        return [view]
    got = {k: block.get(k) for k in wanted}
    if got["Key"] == CLIENT_CERT:
        checks.add(name, False, f"HttpsClient.Key in {where} points at the certificate, not the key")
        return [view]
    shown = {k: v for k, v in got.items() if v is not None}
    if not checks.add(name, got == wanted, f"HttpsClient in {where}: {shown}"):
        return [view]
    kept = effective({}, extra).get("HttpsClient")
    if not bare_data and (not isinstance(kept, dict) or {k: kept.get(k) for k in wanted} != wanted):
        checks.add(f"HttpsClient survives an update ({role})", True,
                   f"only in {ROOTFS_CONF}: an update built without it removes it; "
                   f"put it in {DATA_CONF} (--conf-target data) or into the build", warning=True)  # fmt: skip
    return [view]


def _used(main: dict[str, Any], fallback: dict[str, Any], path: str) -> Used:
    """The value at ``path`` that the client uses, and its file: the main conf's unless it leaves it unset or null."""
    for conf, source in ((main, ROOTFS_CONF), (fallback, DATA_CONF)):
        value = lookup_path(conf, path)
        if value is not None:
            # parse() let through only strings at these paths.
            return Used(str(value), source)
    return Used("", None)


def _check_auth_key(
    checks: Checks, used: dict[str, Any], role: str, source: str | None, wanted: dict[str, str | None]
) -> None:
    name = f"auth requests signed with the certificate's key{f' on {role}' if role else ''}"
    signing = auth_private_key(used)
    if signing is None:
        # Mender client 3.4 then falls back to HttpsClient.Key; nothing promises
        # that other clients do, and a generated key is refused by an accepting edge.
        checks.add(name, False, "no Security.AuthPrivateKey: the client may sign with a key of its own")
    else:
        # The file checked above to hold the certificate's key, or the token's key the device makes.
        if not checks.add(name, signing == wanted["Key"], f"Security.AuthPrivateKey: {signing} from {source}"):
            return
        engine = lookup_path(used, "Security.SSLEngine")
        if engine is not None or wanted["SSLEngine"] is not None:
            # The engine loads the auth key: one for a file key would be asked for a file it cannot load.
            checks.add(f"auth key loaded through {wanted['SSLEngine'] or 'no engine'}{f' on {role}' if role else ''}",
                       engine == wanted["SSLEngine"], f"Security.SSLEngine: {engine!r}")  # fmt: skip


def _check_fsck(checks: Checks, image: Path, volume: Volume) -> None:
    role = volume.role.value
    try:
        # e2fsck -n skips the replay and may find nothing wrong, but the kernel
        # replays the journal at the first mount, over what was written since.
        replayed = not Ext4(image, volume.partition.offset, role).needs_recovery()
    except ImageprovError as exc:
        checks.add(f"journal of {role} replayed", False, str(exc))
        return
    checks.add(f"journal of {role} replayed", replayed, "" if replayed else "needs_recovery is set")
    clean, findings = fsck(image, volume.partition.offset)
    checks.add(f"e2fsck -fn on {role}", clean, findings)
