"""vkeys is a client: importing it loads the generated protos, not the server or the store."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

LOADED = """
import sys
import vkeys, vkeys.api, vkeys.commands, vkeys.format
print("\\n".join(sorted(sys.modules)))
"""


def test_importing_vkeys_loads_no_server_or_store_module() -> None:
    out = subprocess.run(
        [sys.executable, "-c", LOADED], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert "vkeys.commands" in out  # the probe did import it
    server_side = [
        name
        for name in out
        if name.split(".")[0] in ("extauthz", "devstack", "redis")
        or (name.startswith("keys.") and not name.startswith("keys.v1"))
    ]
    assert server_side == []
