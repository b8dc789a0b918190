"""What the real Mender client makes of a main and a fallback mender.conf.

Debian's mender-client (3.x) logs the configuration it loaded under
``--log-level debug``; ``show-artifact`` loads it and exits without a server.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tests.conftest import need, tool


def client_config(main: Path, fallback: Path, tmp_path: Path) -> dict[str, Any]:
    """What Debian's mender client (3.x) loads from ``main`` over ``fallback``, read from its debug log."""
    need("mender")
    data = tmp_path / "client-data"
    data.mkdir(exist_ok=True)
    proc = tool("mender", "--config", main, "--fallback-config", fallback, "--data", data,
                "--log-level", "debug", "--no-syslog", "show-artifact", check=False)  # fmt: skip
    # logrus quotes the message: the struct's own quotes come escaped.
    text = (proc.stdout.decode() + proc.stderr.decode()).replace('\\"', '"')
    loaded = next((ln for ln in text.splitlines() if "Loaded configuration = " in ln), None)
    assert loaded is not None, text[-2000:]

    def field(pattern: str) -> str:
        found = re.search(pattern, loaded)
        assert found, (pattern, loaded)
        return found.group(1)

    return {
        "HttpsClient": {
            "Certificate": field(r'HttpsClient\{Certificate:"([^"]*)"'),
            "Key": field(r'HttpsClient\{[^}]*Key:"([^"]*)"'),
        },
        "Security": {"AuthPrivateKey": field(r'Security\{AuthPrivateKey:"([^"]*)"')},
        "ServerURL": field(r'ServerURL:"([^"]*)"'),
        "ServerCertificate": field(r'ServerCertificate:"([^"]*)"'),
        "TenantToken": field(r'TenantToken:"([^"]*)"'),
    }
