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


def test_update_flags_for_the_money_path_become_the_request_fields() -> None:
    from vkeys.commands import build_parser, update_request

    args = build_parser().parse_args(
        [
            *("update", "0123456789abcdef", "--parallel", "3", "--shadow"),
            *("--model-limit", "gpt-4o=10:20000", "--model-limit", "o3=:500"),
        ]
    )
    request = update_request(args)
    assert request.max_parallel_requests == 3 and request.HasField("enforce")
    assert request.enforce is False
    limits = request.model_limits.limits
    assert (limits["gpt-4o"].rpm_limit, limits["gpt-4o"].tpm_limit) == (10, 20000)
    assert (limits["o3"].rpm_limit, limits["o3"].tpm_limit) == (0, 500)


def test_a_malformed_model_limit_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["update", "0123456789abcdef", "--model-limit", "gpt-4o:10"])
    assert exited.value.code == 2
    assert "expected MODEL=RPM:TPM" in capsys.readouterr().err
