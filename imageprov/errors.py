"""The one error family of imageprov's library code.

Library code raises these; only the CLI turns them into a one-line message and
an exit code. Every error carries a ``hint``: what the user can do about it.
"""

from __future__ import annotations


class ImageprovError(Exception):
    """Base of every error imageprov raises on purpose."""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ToolError(ImageprovError):
    """An external tool is missing or failed."""


class TableError(ImageprovError):
    """The partition table cannot be read or is not sane."""


class LayoutError(ImageprovError):
    """The partitions cannot be mapped to Mender's roles."""


class FilesystemError(ImageprovError):
    """A filesystem inside the image cannot be read or written."""


class PkiError(ImageprovError):
    """The CA, a certificate, a key or the registry is not usable."""


class UsageError(ImageprovError):
    """The user's input (a path, an id, an option) is not acceptable."""
