"""`make run` keeps the tokens it generated, so a restart does not lock the user out."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

import devstack.__main__ as devstack

pytestmark = pytest.mark.unit


def test_a_generated_token_is_kept_across_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(devstack, "RUN_DIR", tmp_path)
    first = devstack.kept_token("admin-token")
    assert devstack.kept_token("admin-token") == first
    assert devstack.kept_token("usage-token") != first


def test_the_kept_token_is_readable_by_its_owner_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(devstack, "RUN_DIR", tmp_path)
    devstack.kept_token("admin-token")
    mode = stat.S_IMODE((tmp_path / "admin-token").stat().st_mode)
    assert mode & 0o077 == 0


def test_an_existing_token_file_is_made_private_when_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(devstack, "RUN_DIR", tmp_path)
    (tmp_path / "usage-token").touch(mode=0o644)
    (tmp_path / "usage-token").chmod(0o644)
    devstack.kept_token("usage-token")
    assert stat.S_IMODE((tmp_path / "usage-token").stat().st_mode) & 0o077 == 0
