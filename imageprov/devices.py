"""Device ids: what the production line gives us, checked before any work starts."""

from __future__ import annotations

import re
from collections.abc import Iterable

from imageprov.errors import UsageError

# Letters, digits and . _ - : only: an id becomes a file name, a certificate
# CN and part of debugfs scripts, and must be safe in all three.
_SAFE = re.compile(r"[A-Za-z0-9._:\-]{1,64}")


def check_device_ids(ids: Iterable[str]) -> list[str]:
    """Return the ids in order, or raise naming the first bad or duplicate one."""
    seen: set[str] = set()
    out = []
    for device_id in ids:
        if not _SAFE.fullmatch(device_id) or device_id in (".", ".."):
            raise UsageError(
                f"device id {device_id!r} is not allowed",
                hint="use 1 to 64 letters, digits, '.', '_', '-' or ':'",
            )
        if device_id in seen:
            raise UsageError(f"device id {device_id!r} is given twice")
        seen.add(device_id)
        out.append(device_id)
    return out
