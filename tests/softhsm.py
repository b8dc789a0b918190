"""A SoftHSM2 token in a temporary directory, for tests of the CA key on a PKCS#11 token.

SOFTHSM2_CONF points SoftHSM at a config naming a token directory under
tmp_path, so that each test has its own tokens and nothing is left behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pkcs11
import pytest

from tests.conftest import IN_CI, tool

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
)
PIN = "4242-fleet"
SO_PIN = "so-pin-4242"


@dataclass(frozen=True)
class SoftHsm:
    conf: Path
    tokens: Path
    module: Path
    label: str
    pin: str = PIN

    def uri(self, obj: str = "fleet-ca") -> str:
        return f"pkcs11:token={self.label};object={obj}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for a subprocess that uses the token (without the CA passphrase)."""
        base = {k: v for k, v in os.environ.items() if k not in ("IMAGEPROV_CA_PASSPHRASE", "IMAGEPROV_PKCS11_PIN")}
        return {**base, "SOFTHSM2_CONF": str(self.conf), "IMAGEPROV_PKCS11_PIN": self.pin, **extra}

    def add_token(self, label: str) -> None:
        """Initialise another token (SOFTHSM2_CONF is set in this process's environment by the fixture)."""
        tool("softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", SO_PIN, "--pin", self.pin)


def softhsm_module() -> Path:
    for candidate in MODULE_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    message = "SoftHSM2's module is missing (scripts/setup --test installs softhsm2)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(name="hsm")
def hsm_fixture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SoftHsm]:
    """One initialised token labelled 'fleet', its PIN in IMAGEPROV_PKCS11_PIN for every subprocess."""
    module = softhsm_module()
    tokens = tmp_path / "softhsm-tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    hsm = SoftHsm(conf, tokens, module, "fleet")
    monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
    monkeypatch.setenv("IMAGEPROV_PKCS11_PIN", PIN)
    monkeypatch.delenv("IMAGEPROV_PKCS11_MODULE", raising=False)
    hsm.add_token(hsm.label)
    # python-pkcs11 keeps a module loaded per process, initialised with the
    # SOFTHSM2_CONF of its time: a test that uses it in-process starts afresh.
    pkcs11.unload(str(module))
    yield hsm
    pkcs11.unload(str(module))
