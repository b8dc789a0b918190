"""``prepare`` on the image a build deploys, compressed or not.

meta-mender deploys ``.sdimg.bz2`` beside ``.sdimg``: a compressed image is
decompressed beside itself, prepared there, and compressed back over itself
in the same compression, atomically; an image already prepared is not written.
"""

from __future__ import annotations

from pathlib import Path

from imageprov.disk.compress import Compression, Meter, quiet, unpacked, write_back
from imageprov.disk.layout import Overrides
from imageprov.mender.conf import Settings
from imageprov.mender.prepare import ConfTarget, Prepared, prepare_in_place


def prepare_image(
    image: Path,
    settings: Settings,
    target: ConfTarget = ConfTarget.AUTO,
    overrides: Overrides | None = None,
    *,
    meter: Meter = quiet,
) -> Prepared:
    """``prepare_in_place``, for a compressed image too (refused before any work if it cannot be written back)."""
    if Compression.of(image) is None:
        return prepare_in_place(image, settings, target, overrides)
    with unpacked(image, meter=meter) as plain:
        done = prepare_in_place(plain, settings, target, overrides)
        if done.changed:
            write_back(plain, image, meter=meter)
    return done
