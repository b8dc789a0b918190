"""Reading a secret (a passphrase, a PIN, a password or token) from the file an option names.

Secrets come from files (or the environment), never from argv. What such a
file holds is never shown: not in a message, not through an exception's text
(a ``UnicodeDecodeError`` quotes the bytes it choked on).
"""

from __future__ import annotations

from pathlib import Path

from imageprov.errors import UsageError

# Far more than any passphrase, PIN or token; less than what /dev/zero or a wrong file would fill memory with.
MAX_SECRET = 64 * 1024


def read_secret_file(file: Path, option: str) -> str:
    """The secret in ``file``, its trailing newline dropped; one clear line if the file cannot be one.

    A pipe (``--passphrase-file <(pass show ca)``, ``/dev/stdin``) is read like a file; at most
    ``MAX_SECRET`` bytes are, so that ``/dev/zero`` or a disk image given by mistake is refused, not read.
    """
    try:
        with open(file, "rb") as handle:
            data = handle.read(MAX_SECRET + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {option} {file}: {exc.strerror}") from None
    if len(data) > MAX_SECRET:
        raise UsageError(
            f"{option} {file} is larger than {MAX_SECRET // 1024} KiB: not a secret", hint="check the path"
        )
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise UsageError(f"{option} {file} is not UTF-8 text", hint="check the path") from None
    secret = text.rstrip("\r\n")  # the newline an editor adds is not part of it
    if not secret:
        raise UsageError(f"{option} {file} is empty", hint="write the secret into it, or use the environment variable")
    return secret
