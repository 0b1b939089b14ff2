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


# --------------------------------------------------------------------------- small jobs on the tiny model

from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def scan_args(prompts, out, model, *extra: str) -> list[str]:
    """A small scan of the tiny model on the CLI: 4 prompts, 2 new tokens, batch size 2."""
    return ["scan", str(prompts), "--out", str(out), "--model", str(model), "--device", "cpu",
            "--max-new-tokens", "2", "--limit", "4", "--batch-sizes", "2", *extra]


def verify_args(prompts, model, *extra: str) -> list[str]:
    """A small verify of the tiny model on the CLI: 4 prompts, 4 new tokens, batch size 3."""
    return ["verify", str(prompts), "--model", str(model), "--device", "cpu", "--max-new-tokens", "4",
            "--batch-size", "3", "--limit", "4", *extra]


def scan_config(prompts, out, model, **kw):
    """The library form of a small scan: 4 prompts, 3 new tokens, batch size 2."""
    from mgaudit.scan import ScanConfig

    base = dict(prompts=str(prompts), out=out, model=str(model), device="cpu", batch_sizes=[2],
                max_new_tokens=3, limit=4)
    base.update(kw)
    return ScanConfig(**base)


def no_model(monkeypatch) -> None:
    """Loading a model fails the test: checks must come first."""
    import mgaudit.models as models

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the output paths were checked")

    monkeypatch.setattr(models, "load_model", boom)
