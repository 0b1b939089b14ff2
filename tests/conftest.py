"""Fixtures shared by the test suite.

* ``tiny_tokenizer``: the local word-level tokenizer of ``tests/tiny_tokenizer.py``;
* ``tiny_model_dir``: a tiny random-weight Llama saved (bfloat16) with that tokenizer;
* ``tiny_lm``: that directory loaded through :func:`mgaudit.models.load_model` on CPU;
* ``prompts_file``: a small JSONL prompt set of words the tiny tokenizer knows;
* ``real_lm``: the default model (SmolLM2-135M) on CPU, for ``@pytest.mark.slow`` tests.

Tests marked ``gpu`` are skipped where no CUDA device is present.

Every test run gets a cache of its own (``MGAUDIT_CACHE``, set in ``pytest_configure``): probe
results and reference runs never come from another run. The default model, its GGUF, the
llama-server build and vLLM's environment are linked in from the machine's cache (they are
inputs, fetched or built once per machine).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_tokenizer import build_tiny_tokenizer  # noqa: E402
# real engines, one per session, prepared in the background (tests/engines.py)
from engines import llama_server, pytest_collection_finish, pytest_sessionfinish, vllm_server  # noqa: E402,F401

#: Prompts of different lengths, all made of words in ``tiny_tokenizer.WORDS``.
TINY_PROMPTS = [
    "what is the sum of two and three",
    "write a python function that returns the first number",
    "how many apples",
    "explain why the train was long",
    "a student has five books and two friends . how many books does each friend get if the student has only half of the books ?",
    "tell me about the city",
    "give a short answer",
    "the car cost ten dollars more than the bus . what is the price of the car if the bus cost four dollars ?",
    "find the total",
    "list three words",
]


#: Cache folders shared with the machine's cache (inputs); everything else is per run.
SHARED_CACHE = ("models", "gguf", "llama-server", "vllm")
_run_cache: dict[str, str] = {}


def pytest_configure(config: pytest.Config) -> None:
    # Tiny bfloat16 matmuls on a shared CPU: with several OpenMP threads they spend
    # most of their time waiting for each other (40x slower here), so tests run
    # single-threaded unless MGAUDIT_TEST_THREADS says otherwise.
    import os
    import tempfile

    import torch

    threads = int(os.environ.get("MGAUDIT_TEST_THREADS", "1") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
    from mgaudit.models import cache_root

    machine = cache_root()
    run = Path(tempfile.mkdtemp(prefix="mgaudit-test-cache-"))
    for sub in SHARED_CACHE:
        (machine / sub).mkdir(parents=True, exist_ok=True)
        (run / sub).symlink_to(machine / sub, target_is_directory=True)
    _run_cache.update(previous=os.environ.get("MGAUDIT_CACHE", ""), run=str(run))
    os.environ["MGAUDIT_CACHE"] = str(run)


def pytest_unconfigure(config: pytest.Config) -> None:
    import os
    import shutil

    if "run" in _run_cache:
        shutil.rmtree(_run_cache["run"], ignore_errors=True)  # the links only, never what they point to
        if _run_cache["previous"]:
            os.environ["MGAUDIT_CACHE"] = _run_cache["previous"]
        else:
            os.environ.pop("MGAUDIT_CACHE", None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer(chat_template=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        attn_implementation="sdpa",
        # The default 0.02 makes a random model repeat one token forever; 0.3 gives
        # varied greedy continuations (and small margins), which the tests need.
        initializer_range=0.3,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = model.to(torch.bfloat16)
    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir: Path):
    from mgaudit.models import load_model

    return load_model(str(tiny_model_dir), dtype="bfloat16", device="cpu")


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_prompts.jsonl"
    lines = [json.dumps({"id": f"tiny-{i:02d}", "prompt": text}) for i, text in enumerate(TINY_PROMPTS)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def real_lm():
    from mgaudit.models import load_model

    return load_model("smollm2", device="cpu")


def cut_after_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """``generate`` keeps padding a row after its EOS: compare up to and including the EOS."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


# --------------------------------------------------------------------------- the audit core's backends


@pytest.fixture(scope="session")
def model_server(tiny_lm):
    """An OpenAI-compatible server decoding with the tiny model, each request alone (tests/model_server.py)."""
    from model_server import ModelServer

    with ModelServer(tiny_lm, behaviour="exact") as srv:
        yield srv


class AuditBackend:
    """A backend of the audit core as the CLI reaches it: ``args`` select it (and its tokenizer)."""

    def __init__(self, name: str, args: list[str], server=None):
        self.name, self.args, self.server = name, args, server

    def __repr__(self) -> str:
        return self.name


@pytest.fixture(params=["local", "endpoint"])
def backend(request, tiny_model_dir) -> AuditBackend:
    """Each behaviour test of scan and verify runs once per backend: the local tiny model, and a
    server decoding with the same model (token ids through its tokenizer)."""
    if request.param == "local":
        return AuditBackend("local", ["--model", str(tiny_model_dir), "--device", "cpu"])
    srv = request.getfixturevalue("model_server")
    return AuditBackend("endpoint", ["--endpoint", srv.url, "--model", str(tiny_model_dir)], srv)
