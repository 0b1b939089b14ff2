"""Helpers for CLI tests: run the app in-process and check one-line errors."""

from __future__ import annotations

from typer.testing import CliRunner


def invoke(args: list[str]):
    from mgaudit.cli import app

    return CliRunner().invoke(app, args)


def stderr_of(result) -> str:
    try:
        return result.stderr
    except (ValueError, AttributeError):  # older click: stderr mixed into output
        return result.output


def assert_one_line_error(result, *needles: str) -> str:
    """Exit 2, exactly one `error:` line on stderr naming every needle, no traceback."""
    err = stderr_of(result)
    assert result.exit_code == 2, (result.exit_code, result.output, err, result.exception)
    assert "Traceback" not in err and "Traceback" not in result.output
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
