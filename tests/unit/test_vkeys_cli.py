"""vkeys' command line, without a server: what a typo prints."""

from __future__ import annotations

import pytest

from vkeys.commands import main

pytestmark = pytest.mark.unit


def test_an_unknown_option_is_shown_with_the_commands_own_usage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["create", "--name", "x", "--rpm-limit", "5"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: vkeys create") and "--rpm" in err
    assert "unrecognized arguments: --rpm-limit 5" in err
