"""Device ids: what the production line gives us, checked before any work starts."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from pathlib import Path

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
            shown = repr(device_id) if len(device_id) <= 64 else f"{device_id[:40]!r}... ({len(device_id)} characters)"
            raise UsageError(
                f"device id {shown} is not allowed",
                hint="use 1 to 64 letters, digits, '.', '_', '-' or ':'",
            )
        if device_id in seen:
            raise UsageError(f"device id {device_id!r} is given twice")
        seen.add(device_id)
        out.append(device_id)
    return out


def read_device_ids(path: Path) -> list[str]:
    """Ids from a file: one per line (blank lines and # comments skipped), or a CSV with a device_id column."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # spreadsheets write a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --device-ids {path}: {exc}") from exc
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise UsageError(f"--device-ids {path} holds no device id")
    header = [cell.strip().lower() for cell in next(csv.reader([lines[0]]))]
    if "device_id" in header:
        # Parsed as a whole: a quoted cell may hold a comma or a line break.
        # Comment lines go first, wherever they are (before the header too).
        kept = [line for line in io.StringIO(text) if not line.lstrip().startswith("#")]
        rows = [row for row in csv.reader(kept) if any(cell.strip() for cell in row)]
        column = [cell.strip().lower() for cell in rows[0]].index("device_id")
        return [row[column].strip() if len(row) > column else "" for row in rows[1:]]
    if len(header) > 1:
        raise UsageError(f"--device-ids {path} looks like a CSV without a device_id column")
    return [line.strip() for line in lines]
