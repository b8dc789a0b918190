"""Options shared by several commands are defined once (imageprov/cli/options.py): same names, help and limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import imageprov


@pytest.mark.parametrize("command", ["stamp", "flash"])
def test_zero_days_is_a_usage_error_for_every_command_that_issues(command: str, tmp_path: Path) -> None:
    # Checked before anything is read: neither the golden image nor the PKI exists.
    target = ["--out", tmp_path / "out"] if command == "stamp" else ["--target", f"{tmp_path / 'card'}=dev-1"]
    proc = imageprov(command, tmp_path / "golden.sdimg", "--pki", tmp_path / "pki", "--device-id", "dev-1",
                     *target, "--days", "0", check=False)  # fmt: skip
    assert proc.returncode == 2
    assert "Invalid value for '--days'" in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "card").exists()


def test_stamp_and_flash_describe_what_each_device_gets_alike() -> None:
    """The parameters that say what a device gets are the very same option objects in both commands."""
    import typing

    from imageprov.cli.flash import flash
    from imageprov.cli.stamp import stamp

    wanted = (
        "server_url",
        "tenant_token",
        "conf_target",
        "auth_key",
        "days",
        "curve",
        "passphrase_file",
        "pin_file",
        "pki",
    )
    stamp_hints = typing.get_type_hints(stamp, include_extras=True)
    flash_hints = typing.get_type_hints(flash, include_extras=True)
    for name in wanted:
        assert stamp_hints[name].__metadata__[0] is flash_hints[name].__metadata__[0], name
