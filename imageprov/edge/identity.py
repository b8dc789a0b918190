"""The identity an auth request claims, bound to the certificate it comes with: pure decisions.

Mender identifies a device by its ``id_data``; the certificate only proves
which key signs. Left unbound (Mender Gateway, mtls-ambassador), one key
pulled off one card enrolls any number of identities and locks the real
devices out (their preauthorization then gets 409). ``edge serve --identity``
binds them:

- ``pin``: the registry records the first identity a certificate presents;
  afterwards each holds only the other (``Registry.pin_identity`` decides,
  atomically, for every edge instance at once);
- ``attribute:NAME``: ``id_data[NAME]`` must be the certificate's CN, which
  is the device id the line stamped;
- ``none``: anything goes, with a warning.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imageprov.edge.checks import Reason, Refused
from imageprov.pki.registry import PinResult, PinVerdict


def check_attribute(identity: Mapping[str, Any], attribute: str, common_name: str) -> None:
    """``id_data[attribute]`` is the certificate's CN, exactly (a string, same case)."""
    if not common_name:
        raise Refused(Reason.IDENTITY_MISMATCH, "the certificate has no CN to bind the identity to")
    value = identity.get(attribute)
    if not isinstance(value, str) or value != common_name:
        raise Refused(Reason.IDENTITY_MISMATCH, f"id_data[{attribute!r}] is not the certificate's CN")


def check_pin(result: PinResult) -> bool:
    """Whether the device must be preauthorized with ``force`` (its identity moved to this certificate);
    raises ``Refused`` when the certificate and the identity are bound to others."""
    if result.verdict is PinVerdict.CERTIFICATE_PINNED_ELSEWHERE:
        raise Refused(Reason.IDENTITY_PINNED, "this certificate is bound to another identity")
    if result.verdict is PinVerdict.IDENTITY_TAKEN:
        raise Refused(Reason.IDENTITY_TAKEN, "this identity is bound to another certificate")
    return result.verdict is PinVerdict.REPINNED
