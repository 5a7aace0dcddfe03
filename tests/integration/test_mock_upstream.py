"""The dev stack's mock upstream writes what it received, for a user to look at."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devstack import processes as p
from devstack.mock_upstream import MockUpstream
from tests.helpers import fetch

pytestmark = pytest.mark.integration


def test_each_request_is_logged_with_its_identity_headers_and_no_key(tmp_path: Path) -> None:
    log = tmp_path / "upstream.log"
    upstream = MockUpstream(p.free_port(), "127.0.0.1:1", "t", log_path=log).start()
    try:
        fetch(upstream.port, "GET", "/v1/models", {"x-virtual-key-id": "a" * 16})
        fetch(
            upstream.port,
            "GET",
            "/v1/models",
            {"authorization": "Bearer sk-mp-x", "x-virtual-key-note": "sk-mp-y"},
        )
    finally:
        upstream.stop()
    first, second = (json.loads(line) for line in log.read_text().splitlines())
    assert first["x-virtual-key-id"] == "a" * 16 and not first["key_header_reached_upstream"]
    assert second["key_header_reached_upstream"]
    assert "sk-mp-x" not in log.read_text() and "sk-mp-y" not in log.read_text()
