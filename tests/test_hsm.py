"""The CA key on a PKCS#11 token (SoftHSM2): made there, signs there, never leaves.

Checked with openssl and pkcs11-tool, not with imageprov's own readers.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, ObjectClass

from imageprov.disk.golden import Scheme
from imageprov.pki.ca import CertificateAuthority, Subject, load_ca
from imageprov.pki.pkcs11 import KeyReference, Pkcs11Uri
from imageprov.pki.token import TokenKey, open_key
from tests.conftest import debugfs, imageprov, imageprov_pki, roles, tool
from tests.softhsm import SoftHsm, hsm_fixture  # noqa: F401  (the fixture 'hsm')
from tests.test_e2e import edge, identity_script, upstream  # noqa: F401  (fixtures of the end-to-end test)
from tests.test_e2e import test_good_device_accepted_revoked_and_foreign_refused as _e2e
from tests.test_edge_e2e import identity_runner  # noqa: F401  (a fixture of the edge's end-to-end test)
from tests.test_edge_e2e import test_stamped_device_is_accepted_through_the_edge_and_pending_without_it as _edge_e2e

SUBJECT = ("--cn", "Test Fleet CA", "--org", "imageprov tests", "--country", "NO")
# Key material in a file: PEM private keys of any kind, an ECPrivateKey (RFC 5915:
# version 1, then the scalar as a 32/48/66-byte octet string) or a PKCS#8
# PrivateKeyInfo for EC (version 0, then the id-ecPublicKey algorithm).
KEY_PATTERNS = (
    re.compile(rb"PRIVATE KEY-----"),
    re.compile(rb"\x02\x01\x01\x04[\x20\x30\x42]"),
    re.compile(rb"\x02\x01\x00\x30\x13\x06\x07\x2a\x86\x48\xce\x3d\x02\x01"),
)


def run(hsm: SoftHsm, *args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The real CLI, with the token's PIN in the environment unless ``env`` says otherwise; no terminal."""
    return subprocess.run(
        [sys.executable, "-m", "imageprov", *map(str, args)],
        capture_output=True,
        text=True,
        env=hsm.env(**env),
        stdin=subprocess.DEVNULL,
    )


def ok(hsm: SoftHsm, *args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
    proc = run(hsm, *args, **env)
    assert proc.returncode == 0, proc.stderr
    return proc


def init_token_ca(hsm: SoftHsm, pki: Path, *extra: str, obj: str = "fleet-ca") -> None:
    ok(hsm, "ca", "init", pki, *SUBJECT, "--pkcs11", hsm.uri(obj), "--module", hsm.module, *extra)


def key_material(*roots: Path) -> list[str]:
    """Files under ``roots`` that hold a private key in PEM or DER."""
    found = []
    for root in roots:
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            data = path.read_bytes()
            found += [f"{path}: {pattern.pattern!r}" for pattern in KEY_PATTERNS if pattern.search(data)]
    return found


def token_objects(hsm: SoftHsm) -> str:
    return tool(
        "pkcs11-tool", "--module", hsm.module, "--token-label", hsm.label, "--login", "--pin", hsm.pin,
        "--list-objects",
    ).stdout.decode()  # fmt: skip


def test_batch_signed_on_the_token(
    hsm: SoftHsm, make_golden: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temp = tmp_path / "tmp"  # every temporary file imageprov makes, to search for key material afterwards
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    pki = tmp_path / "pki"
    init_token_ca(hsm, pki)
    assert sorted(p.name for p in pki.iterdir()) == ["ca-cert.pem", "ca-key.pkcs11.json", "registry.sqlite"]
    ca_cert = pki / "ca-cert.pem"

    # The key's attributes, read back from the token by another tool: it cannot leave.
    listing = token_objects(hsm)
    private = listing.split("Private Key Object; EC")[1].split("Object;")[0]
    assert "label:      fleet-ca" in private
    assert "sensitive" in private and "never extractable" in private and "always sensitive" in private
    assert "Usage:      sign\n" in private
    # ... and by python-pkcs11: the token refuses to give out the private value.
    token = pkcs11.lib(str(hsm.module)).get_token(token_label=hsm.label)
    with token.open(user_pin=hsm.pin) as session:
        key = session.get_key(ObjectClass.PRIVATE_KEY, label="fleet-ca")
        assert key[Attribute.EXTRACTABLE] is False and key[Attribute.SENSITIVE] is True
        assert key[Attribute.NEVER_EXTRACTABLE] is True and key[Attribute.ALWAYS_SENSITIVE] is True
        with pytest.raises(pkcs11.AttributeSensitive):
            key[Attribute.VALUE]

    # Everything the CA signs: the edge's certificate, a batch of devices (several workers), a CRL.
    ok(hsm, "server-cert", "--pki", pki, "--host", "edge.local", "--ip", "127.0.0.1", "--out", tmp_path / "edge")
    golden = make_golden(Scheme.MBR)
    out = tmp_path / "out"
    ids = ["hsm-1", "hsm-2", "hsm-3", "hsm-4"]
    ok(hsm, "stamp", golden, "--pki", pki, "--out", out, *[a for i in ids for a in ("--device-id", i)])
    ok(hsm, "revoke", "--pki", pki, "hsm-4", "--reason", "key-compromise")
    crl = tmp_path / "crl.pem"
    pin_file = tmp_path / "pin"
    pin_file.write_text(hsm.pin + "\n")
    ok(hsm, "crl", "--pki", pki, "--out", crl, "--pin-file", pin_file, IMAGEPROV_PKCS11_PIN="")

    verified = tool("openssl", "verify", "-CAfile", ca_cert, "-purpose", "sslserver", "-verify_hostname", "edge.local",
                    tmp_path / "edge/server-cert.pem")  # fmt: skip
    assert b": OK" in verified.stdout
    checked = tool("openssl", "crl", "-in", crl, "-CAfile", ca_cert, "-noout")
    assert b"verify OK" in (checked.stdout + checked.stderr)
    data = roles(out / "hsm-1.sdimg")["data"]
    for device in ids:
        cert = tmp_path / f"{device}.pem"
        cert.write_text(debugfs(out / f"{device}.sdimg", data, "cat /mender/mender-cert.pem"))
        verified = tool("openssl", "verify", "-CAfile", ca_cert, "-purpose", "sslclient", cert)
        assert b": OK" in verified.stdout, verified.stderr
        with_crl = tool("openssl", "verify", "-CAfile", ca_cert, "-CRLfile", crl, "-crl_check", cert, check=False)
        assert (with_crl.returncode == 0) == (device != "hsm-4"), with_crl.stdout + with_crl.stderr
    report = imageprov("verify", out / "hsm-1.sdimg", "--ca", ca_cert, "--crl", crl, "--device-id", "hsm-1")
    assert "FAIL" not in report.stdout

    # No key material in the PKI, in the temporary directory, or in the token's store in the clear.
    assert key_material(pki, temp, hsm.tokens) == []
    # The check can fail: a device key written where it looks is found.
    assert key_material(out.parent / "edge")


def test_p384_ca_on_the_token(hsm: SoftHsm, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_token_ca(hsm, pki, "--curve", "P-384")
    ok(hsm, "device-cert", "--pki", pki, "--device-id", "d-384", "--out", tmp_path / "d")
    text = tool("openssl", "x509", "-in", pki / "ca-cert.pem", "-noout", "-text").stdout.decode()
    assert "NIST CURVE: P-384" in text and "ecdsa-with-SHA384" in text
    verified = tool("openssl", "verify", "-CAfile", pki / "ca-cert.pem", tmp_path / "d/mender-cert.pem")
    assert b": OK" in verified.stdout


def test_import_adopts_a_key_already_on_the_token(hsm: SoftHsm, tmp_path: Path) -> None:
    # A CA made with the manual recipe's openssl commands, its key then put on the token.
    subprocess.run(["openssl", "ecparam", "-genkey", "-name", "P-256", "-noout", "-out", "ca.key"], cwd=tmp_path,
                   check=True)  # fmt: skip
    subprocess.run(["openssl", "req", "-new", "-x509", "-key", "ca.key", "-out", "ca.pem", "-subj", "/CN=Adopted CA",
                    "-days", "30"], cwd=tmp_path, check=True)  # fmt: skip
    tool("openssl", "pkcs8", "-topk8", "-nocrypt", "-in", tmp_path / "ca.key", "-outform", "DER",
         "-out", tmp_path / "ca.der")  # fmt: skip
    tool("pkcs11-tool", "--module", hsm.module, "--token-label", hsm.label, "--login", "--pin", hsm.pin,
         "--write-object", tmp_path / "ca.der", "--type", "privkey", "--label", "adopted", "--id", "42")  # fmt: skip
    (tmp_path / "ca.key").unlink()
    (tmp_path / "ca.der").unlink()

    # Another CA's certificate does not match the key on the token.
    other = tmp_path / "other"
    ok(hsm, "ca", "init", other, "--cn", "Other", "--no-passphrase")
    uri = hsm.uri("adopted")
    proc = run(hsm, "ca", "import", tmp_path / "bad", "--cert", other / "ca-cert.pem", "--pkcs11", uri, "--module",
               hsm.module)  # fmt: skip
    assert proc.returncode == 1 and "does not match the CA certificate" in proc.stderr
    assert not (tmp_path / "bad").exists()

    pki = tmp_path / "pki"
    proc = ok(hsm, "ca", "import", pki, "--cert", tmp_path / "ca.pem", "--pkcs11", uri, "--module", hsm.module)
    # A key that was a file once: imported, and said so.
    assert "note: this key has not always been on the token" in proc.stderr
    assert '"uri": "pkcs11:token=fleet;object=adopted;id=%42;type=private"' in (pki / "ca-key.pkcs11.json").read_text()
    ok(hsm, "device-cert", "--pki", pki, "--device-id", "adopted-1", "--out", tmp_path / "d")
    verified = tool("openssl", "verify", "-CAfile", tmp_path / "ca.pem", tmp_path / "d/mender-cert.pem")
    assert b": OK" in verified.stdout
    assert key_material(pki) == []


def _lock(hsm: SoftHsm, label: str) -> None:
    """Set CKF_USER_PIN_LOCKED in SoftHSM's token file, as a token's firmware does after too many wrong PINs.

    SoftHSM itself never locks; its token file holds the token flags as the
    vendor attribute 0x8000534b (big-endian: attribute, type 2 = integer, value).
    """
    for path in hsm.tokens.glob("*/token.object"):
        data = bytearray(path.read_bytes())
        if f"{label:<32}".encode() not in data:
            continue
        at = data.index(bytes.fromhex("00000000 8000534b 00000000 00000002".replace(" ", ""))) + 16
        flags = int.from_bytes(data[at : at + 8], "big") | 0x00040000
        data[at : at + 8] = flags.to_bytes(8, "big")
        path.write_bytes(bytes(data))
        return
    raise AssertionError(f"no token {label}")


def test_token_errors_are_one_line_with_a_hint(hsm: SoftHsm, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    # Refused before anything is made on the token.
    for bad, message in (
        (("--days", "0"), "--days must be at least 1"),
        (("--curve", "P-521"), "P-256 or P-384"),
        (("--country", "Norway"), "two-letter code"),
        (("--no-passphrase",), "not a token"),
    ):
        proc = run(hsm, "ca", "init", pki, *SUBJECT, "--pkcs11", hsm.uri(), "--module", hsm.module, *bad)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    # Made, then the CA cannot be written: the key pair is removed from the token again.
    (tmp_path / "a-file").write_text("")
    proc = run(hsm, "ca", "init", tmp_path / "a-file" / "pki", *SUBJECT, "--pkcs11", hsm.uri(), "--module", hsm.module)
    assert proc.returncode == 1 and "cannot write the CA into" in proc.stderr, proc.stderr
    assert "Key Object" not in token_objects(hsm)
    init_token_ca(hsm, pki)
    # The reference pins the key by label and id: a new key may take neither.
    key_id = re.search(r"id=([%0-9a-f]+)", (pki / "ca-key.pkcs11.json").read_text())
    assert key_id is not None
    taken = f"pkcs11:token=fleet;object=new;id={key_id[1]}"
    proc = run(hsm, "ca", "init", tmp_path / "p3", "--cn", "x", "--pkcs11", taken, "--module", hsm.module)
    assert proc.returncode == 1 and "already holds a private key object=new id=" in proc.stderr, proc.stderr

    device = ("device-cert", "--pki", pki, "--device-id", "d", "--out", tmp_path / "d")
    empty_pin = tmp_path / "empty-pin"
    empty_pin.write_text("\n")
    pin_dir = tmp_path / "pin-dir"
    pin_dir.mkdir()
    cases: list[tuple[tuple[str | Path, ...], dict[str, str], int, str]] = [
        (device, {"IMAGEPROV_PKCS11_PIN": "0000"}, 1, "wrong PIN for token 'fleet' (check the PIN"),
        (device, {"IMAGEPROV_PKCS11_PIN": ""}, 1, "token 'fleet' needs its user PIN (set $IMAGEPROV_PKCS11_PIN"),
        ((*device, "--pin-file", empty_pin), {}, 2, f"--pin-file {empty_pin} is empty"),
        ((*device, "--pin-file", pin_dir), {}, 2, f"cannot read --pin-file {pin_dir}: Is a directory"),
        ((*device, "--pin-file", tmp_path / "nope"), {}, 2, "No such file or directory"),
        (device, {"IMAGEPROV_PKCS11_MODULE": "/etc/hostname"}, 1, "cannot load PKCS#11 module /etc/hostname"),
        (device, {"IMAGEPROV_PKCS11_MODULE": str(tmp_path / "gone.so")}, 1, "gone.so does not exist (install"),
        (("ca", "init", tmp_path / "p2", "--cn", "x", "--pkcs11", "pkcs11:token=absent;object=k", "--module",
          hsm.module), {}, 1, "no PKCS#11 token with token=absent in"),
        (("ca", "init", tmp_path / "p2", "--cn", "x", "--pkcs11", hsm.uri(), "--module", hsm.module), {}, 1,
         "token 'fleet' already holds a private key object=fleet-ca (adopt it with 'imageprov ca import --pkcs11'"),
        (("ca", "init", tmp_path / "p2", "--cn", "x", "--pkcs11", hsm.uri() + "?pin-value=1234"), {}, 2,
         "a PIN in the PKCS#11 URI"),
        (("ca", "init", tmp_path / "p2", "--cn", "x", "--pkcs11", "pkcs11:token=fleet;slot=3;object=k"), {}, 2,
         "attribute 'slot' is not supported"),
        (("ca", "import", tmp_path / "p2", "--cert", pki / "ca-cert.pem", "--pkcs11", hsm.uri("nosuch"),
          "--module", hsm.module), {}, 1, "no private key object=nosuch on the token (list the token's keys"),
    ]  # fmt: skip
    for args, env, code, message in cases:
        proc = run(hsm, *args, **env)
        assert (proc.returncode, len(proc.stderr.strip().splitlines())) == (code, 1), (args, env, proc.stderr)
        assert message in proc.stderr, (args, env, proc.stderr)
    assert not (tmp_path / "d").exists() and not (tmp_path / "p2").exists()

    # The token is not there (unplugged: SoftHSM with no tokens), or the module cannot start (no config).
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.conf").write_text(f"directories.tokendir = {tmp_path / 'empty'}\nlog.level = ERROR\n")
    proc = run(hsm, *device, SOFTHSM2_CONF=str(tmp_path / "empty.conf"))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert (
        "no PKCS#11 token with token=fleet in" in proc.stderr
        and "(is it plugged in? tokens present: none)" in proc.stderr
    )
    proc = run(hsm, *device, SOFTHSM2_CONF=str(tmp_path / "none.conf"))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "cannot start: GeneralError (check its configuration: SoftHSM reads $SOFTHSM2_CONF" in proc.stderr
    # A locked token: refused before any PIN is tried on it.
    _lock(hsm, hsm.label)
    proc = run(hsm, *device)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "token 'fleet' is locked" in proc.stderr and "security officer" in proc.stderr


def test_one_token_session_signs_for_many_threads(hsm: SoftHsm, tmp_path: Path) -> None:
    """The stamping pipeline signs from worker threads: every signature made at once must verify."""
    pki = tmp_path / "pki"
    init_token_ca(hsm, pki)
    ca = load_ca(pki, None, pin=lambda _: hsm.pin)
    assert isinstance(ca.key, TokenKey)
    public = ca.key.public_key()
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def sign_many(worker: int) -> None:
        start.wait()
        for n in range(25):
            data = f"{worker}-{n}".encode()
            try:
                public.verify(ca.key.sign(data, ec.ECDSA(hashes.SHA256())), data, ec.ECDSA(hashes.SHA256()))
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=sign_many, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    leaf = ca.issue_device("thread-1")
    ca.key.close()
    (tmp_path / "leaf.pem").write_bytes(leaf.cert_pem())
    assert b": OK" in tool("openssl", "verify", "-CAfile", pki / "ca-cert.pem", tmp_path / "leaf.pem").stdout


@pytest.fixture
def pki(tmp_path: Path, hsm: SoftHsm) -> Path:
    """The end-to-end test's PKI (it overrides conftest's), with the CA key on the token."""
    path = tmp_path / "pki"
    imageprov_pki("ca", "init", path, *SUBJECT, "--pkcs11", hsm.uri(), "--module", hsm.module)
    assert (path / "ca-key.pkcs11.json").exists() and not (path / "ca-private.key").exists()
    return path


# The end-to-end tests (real nginx, real Mender client; and the accepting edge) once more, with the CA key on
# the token: the certificates it signs are the same to every reader.
test_e2e_with_the_ca_key_on_a_token = _e2e
test_edge_e2e_with_the_ca_key_on_a_token = _edge_e2e


def test_pin_prompt_on_a_terminal(hsm: SoftHsm, tmp_path: Path) -> None:
    """Without $IMAGEPROV_PKCS11_PIN or --pin-file, the PIN is asked for on the terminal, and only the PIN."""
    pki = tmp_path / "pki"
    init_token_ca(hsm, pki)
    primary, secondary = pty.openpty()

    def controlling_terminal() -> None:  # getpass reads /dev/tty: the pty must be this session's terminal
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    argv = [
        sys.executable,
        "-m",
        "imageprov",
        "device-cert",
        "--pki",
        pki,
        "--device-id",
        "tty-1",
        "--out",
        tmp_path / "d",
    ]
    proc = subprocess.Popen(
        argv,
        stdin=secondary, stdout=secondary, stderr=secondary, env=hsm.env(IMAGEPROV_PKCS11_PIN=""),
        preexec_fn=controlling_terminal,
    )  # fmt: skip
    os.close(secondary)
    seen = b""
    deadline = time.monotonic() + 60
    while b"user PIN of token 'fleet': " not in seen:
        assert time.monotonic() < deadline and proc.poll() is None, seen
        ready, _, _ = select.select([primary], [], [], 1)
        if ready:
            seen += os.read(primary, 1024)
    assert b"passphrase" not in seen  # the CA key is on the token: no passphrase is asked for
    os.write(primary, hsm.pin.encode() + b"\n")
    assert proc.wait(60) == 0
    with contextlib.suppress(OSError):  # the rest of the output; EIO once the child has closed the terminal
        while select.select([primary], [], [], 0.2)[0]:
            seen += os.read(primary, 1024)
    os.close(primary)
    assert hsm.pin.encode() not in seen  # not echoed
    assert b"wrote" in seen and (tmp_path / "d/mender-cert.pem").exists()


def test_a_broken_key_reference_is_one_line(hsm: SoftHsm, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_token_ca(hsm, pki)
    reference = pki / "ca-key.pkcs11.json"
    good = reference.read_text()
    device = ("device-cert", "--pki", pki, "--device-id", "d", "--out", tmp_path / "d")
    for text, message in (
        ("{not json", "is not a readable PKCS#11 key reference"),
        ('{"uri": "pkcs11:token=fleet;object=fleet-ca;pin-value=1"}', "is not a readable PKCS#11 key reference"),
        (good.replace("object=fleet-ca", "object=gone").replace("id=", "x-id="), "attribute 'x-id' is not supported"),
        (good.replace("object=fleet-ca", "object=gone"), "no private key object=gone id="),
    ):
        reference.write_text(text)
        proc = run(hsm, *device)
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert message in proc.stderr, proc.stderr
    reference.write_text(good)
    (pki / "ca-private.key").write_text("")
    proc = run(hsm, *device)
    assert proc.returncode == 1 and "holds both ca-private.key and ca-key.pkcs11.json" in proc.stderr
    assert not (tmp_path / "d").exists()


def test_key_that_wants_the_pin_at_every_signature(hsm: SoftHsm, tmp_path: Path) -> None:
    """CKA_ALWAYS_AUTHENTICATE, as on a PIV card's signature key: each signature logs in again with the PIN."""
    tool("pkcs11-tool", "--module", hsm.module, "--token-label", hsm.label, "--login", "--pin", hsm.pin,
         "--keypairgen", "--key-type", "EC:prime256v1", "--label", "piv", "--id", "9c", "--always-auth")  # fmt: skip
    spki = tool("pkcs11-tool", "--module", hsm.module, "--token-label", hsm.label, "--read-object", "--type", "pubkey",
                "--id", "9c").stdout  # fmt: skip
    public = serialization.load_der_public_key(spki)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    uri = Pkcs11Uri.parse(hsm.uri("piv"))
    key = open_key(KeyReference(uri, hsm.module), public, lambda _: hsm.pin)  # signs once to prove the key
    ca = CertificateAuthority.create(Subject("PIV CA"), key=key)
    key.close()
    (tmp_path / "ca.pem").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    pki = tmp_path / "pki"
    ok(hsm, "ca", "import", pki, "--cert", tmp_path / "ca.pem", "--pkcs11", hsm.uri("piv"), "--module", hsm.module)
    ok(hsm, "device-cert", "--pki", pki, "--device-id", "piv-1", "--out", tmp_path / "d")
    ok(hsm, "crl", "--pki", pki, "--out", tmp_path / "crl.pem")
    verified = tool("openssl", "verify", "-CAfile", tmp_path / "ca.pem", "-CRLfile", tmp_path / "crl.pem",
                    "-crl_check", tmp_path / "d/mender-cert.pem")  # fmt: skip
    assert b": OK" in verified.stdout


def test_pkcs11_uris() -> None:
    """RFC 7512 URIs: percent-encoding both ways, the key's id as bytes, and what must not be in a URI."""
    from imageprov.errors import UsageError

    uri = Pkcs11Uri.parse("pkcs11:token=Fleet%20CA;serial=abc;object=ca%3Bkey;id=%01%ff;type=private"
                          "?module-path=/usr/lib/x.so")  # fmt: skip
    assert (uri.token, uri.serial, uri.object, uri.id, uri.module_path) == ("Fleet CA", "abc", "ca;key",
                                                                            b"\x01\xff", "/usr/lib/x.so")  # fmt: skip
    assert str(uri) == "pkcs11:token=Fleet%20CA;serial=abc;object=ca%3Bkey;id=%01%ff;type=private"
    assert Pkcs11Uri.parse(str(uri)) == Pkcs11Uri("Fleet CA", "abc", object="ca;key", id=b"\x01\xff")
    for bad, message in (
        ("token=x;object=y", "is not a PKCS#11 URI"),
        ("pkcs11:token=x", "does not name a key"),
        ("pkcs11:token=x;object=y;type=public", "must name a private key"),
        ("pkcs11:token=x;object=y;object=z", "given twice"),
        ("pkcs11:token=x;slot-id=1;object=y", "'slot-id' is not supported"),
        ("pkcs11:object=y?pin-source=file:/pin", "a PIN in the PKCS#11 URI"),
        ("pkcs11:object=y?module-name=softhsm2", "'module-name' is not supported"),
    ):
        with pytest.raises(UsageError, match=message):
            Pkcs11Uri.parse(bad)
