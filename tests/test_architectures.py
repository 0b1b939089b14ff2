"""Every architecture: exact under always, gate and invariant, or refused before decoding.

A matrix of tiny random-weight models built from transformers configs (no downloads):
for each, the four policies are run on one batch of six prompts of 3-21 tokens for
20 new tokens and compared with ``engine.solo_decode`` (what ``generate`` gives at batch
size 1). The exact policies must give the solo tokens *and* the solo logits bit for bit
at every step (random tiny models rarely flip a token, so tokens alone prove little);
where the capability table refuses a policy, ``decode`` must raise UsageError (exit 2)
before any forward pass. Sliding windows are small (4-8) so every sequence passes its
window; ``mistral-w4``'s prompts all exceed its window.

The exact policies run through ``decode_batch`` with ``max_rows=1`` in the policy (every linear
layer one row at a time): GEMM row-invariance is the probe's business
(tests/test_gated.py); this matrix isolates what depends on the architecture
(attention windows and masks, cache layer classes, softcapping, sinks, MoE routing).
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

import mgaudit.decoding.ragged as ragged
from mgaudit.decoding.architectures import EXACT, TESTED, capabilities, check_supported
from mgaudit.decoding.cache_ops import (batch_cache, columns_equal, layer_span, pad_cache_left, row_cache,
                               write_columns)
from mgaudit.decoding.stock import solo_decode
from mgaudit.decoding.step import forward_last, new_cache
from mgaudit.errors import UsageError
from mgaudit.decoding.policies import DecodePolicy, decode, decode_batch

VOCAB = 96
LENGTHS = [3, 5, 9, 12, 17, 21]
NEW = 20
POLICIES = {
    "none": DecodePolicy("none"),
    "always": DecodePolicy("always"),
    "gate": DecodePolicy("gate", 0.5),
    "invariant": DecodePolicy("invariant"),
}


def _common(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return base


def _configs():
    import transformers as T

    alt3 = ["sliding_attention", "full_attention", "sliding_attention"]
    return {
        "llama": lambda: T.LlamaConfig(**_common()),
        "llama-eager": lambda: T.LlamaConfig(**_common(), attn_implementation="eager"),
        "qwen2": lambda: T.Qwen2Config(**_common()),
        # layer 0 full, layers 1-2 sliding (max_window_layers)
        "qwen2-window": lambda: T.Qwen2Config(**_common(num_hidden_layers=3), use_sliding_window=True,
                                              sliding_window=8, max_window_layers=1),
        "qwen3": lambda: T.Qwen3Config(**_common(), head_dim=16),
        "mistral": lambda: T.MistralConfig(**_common(), sliding_window=8),
        "mistral-w4": lambda: T.MistralConfig(**_common(), sliding_window=4),  # every prompt exceeds the window
        "gemma2": lambda: T.Gemma2Config(**_common(), head_dim=16, sliding_window=8, attn_implementation="eager"),
        "gemma3": lambda: T.Gemma3TextConfig(**_common(num_hidden_layers=3), head_dim=16, sliding_window=8,
                                             layer_types=alt3),
        "gemma3-eager": lambda: T.Gemma3TextConfig(**_common(num_hidden_layers=3), head_dim=16, sliding_window=6,
                                                   layer_types=alt3, attn_implementation="eager"),
        "phi3": lambda: T.Phi3Config(**_common()),
        "phi3-window": lambda: T.Phi3Config(**_common(), sliding_window=8),
        "olmo2": lambda: T.Olmo2Config(**_common()),
        "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                                            initializer_range=0.3, bos_token_id=1, eos_token_id=2),
        "mixtral": lambda: T.MixtralConfig(**_common(), num_local_experts=4, num_experts_per_tok=2, sliding_window=8),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(**_common(), num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=32, shared_expert_intermediate_size=64),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**_common(), num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=32, head_dim=16),
        "gpt_oss": lambda: T.GptOssConfig(**_common(), head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                          sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                                          attn_implementation="eager"),
        "bloom": lambda: T.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, initializer_range=0.3,
                                       bos_token_id=1, eos_token_id=2, pad_token_id=0),
        "falcon-alibi": lambda: T.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, alibi=True, initializer_range=0.3,
                                               bos_token_id=1, eos_token_id=2, pad_token_id=0),
        # refused for every exact policy: linear attention, KV sharing, chunked attention
        "qwen3_next": lambda: T.Qwen3NextConfig(**_common(num_hidden_layers=4), head_dim=16, num_experts=4,
                                                num_experts_per_tok=2, moe_intermediate_size=32,
                                                shared_expert_intermediate_size=32, linear_num_value_heads=4,
                                                linear_num_key_heads=2, linear_key_head_dim=16,
                                                linear_value_head_dim=16),
        "gemma3n": lambda: T.Gemma3nTextConfig(**_common(num_hidden_layers=4), head_dim=16, sliding_window=8,
                                               num_kv_shared_layers=2, laurel_rank=8, hidden_size_per_layer_input=8,
                                               vocab_size_per_layer_input=VOCAB, altup_num_inputs=2,
                                               activation_sparsity_pattern=[0.0] * 4,
                                               layer_types=["sliding_attention", "full_attention"] * 2),
        "llama4": lambda: T.Llama4TextConfig(**_common(), head_dim=16, attention_chunk_size=8, num_local_experts=2,
                                             interleave_moe_layer_step=1, intermediate_size_mlp=128),
    }


CONFIGS = _configs()

#: What the capability table must say per architecture: exact policies, sliding windows, MoE.
EXPECTED = {
    "llama": (EXACT, set(), False),
    "llama-eager": (EXACT, set(), False),
    "qwen2": (EXACT, set(), False),
    "qwen2-window": (EXACT, {8}, False),
    "qwen3": (EXACT, set(), False),
    "mistral": (EXACT, {8}, False),
    "mistral-w4": (EXACT, {4}, False),
    "gemma2": (EXACT, {8}, False),
    "gemma3": (EXACT, {8}, False),
    "gemma3-eager": (EXACT, {6}, False),
    "phi3": (EXACT, set(), False),
    "phi3-window": (EXACT, {8}, False),
    "olmo2": (EXACT, set(), False),
    "gpt_neox": (EXACT, set(), False),
    "mixtral": (EXACT, {8}, True),
    "qwen2_moe": (EXACT, set(), True),
    "qwen3_moe": (EXACT, set(), True),
    "gpt_oss": (EXACT, {8}, True),
    "bloom": (("always",), set(), False),
    "falcon-alibi": (("always",), set(), False),
    "qwen3_next": ((), set(), True),
    "gemma3n": ((), {8}, False),
    "llama4": ((), set(), True),
}
assert set(EXPECTED) == set(CONFIGS)

_models: dict[str, SimpleNamespace] = {}


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[1] + [rng.randrange(3, VOCAB) for _ in range(n - 1)] for n in LENGTHS]


def _arch(name: str) -> SimpleNamespace:
    """The tiny model of ``name`` (bf16, seed 0) and its solo references, built once."""
    if name not in _models:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(CONFIGS[name]()).to(torch.bfloat16).eval()
        prompts = _prompts()
        solos = [solo_decode(model, p, NEW, [], keep_logits=True) for p in prompts]
        _models[name] = SimpleNamespace(name=name, model=model, prompts=prompts, solos=solos)
    return _models[name]


def _fresh(policy: DecodePolicy) -> DecodePolicy:
    return DecodePolicy(policy.name, policy.threshold, policy.fast_path, policy.max_rows)


def _one_row(policy: DecodePolicy) -> DecodePolicy:
    """``policy`` with every linear layer of the ragged path one row at a time."""
    return DecodePolicy(policy.name, policy.threshold, policy.fast_path, max_rows=1)


def _run_exact(a: SimpleNamespace, policy: DecodePolicy):
    check_supported(a.model, policy.name)
    return decode_batch(a.model, a.prompts, _one_row(policy), NEW, [], 0, keep_logits=True)


def _assert_solo(a: SimpleNamespace, results, label: str) -> None:
    for i, (r, s) in enumerate(zip(results, a.solos)):
        assert r.tokens == s.tokens, (label, i, r.tokens, s.tokens)
        assert len(r.logits) == len(s.logits) == NEW
        for step, (got, ref) in enumerate(zip(r.logits, s.logits)):
            assert torch.equal(got.float(), ref.float()), \
                (label, f"row {i} (prompt {len(a.prompts[i])} tokens) step {step}",
                 float((got.float() - ref.float()).abs().max()))


class _CountForwards:
    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# --------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_matrix(arch: str, policy: str) -> None:
    a = _arch(arch)
    exact, _, _ = EXPECTED[arch]
    if policy != "none" and policy not in exact:
        with _CountForwards(a.model) as calls, pytest.raises(UsageError) as exc:
            decode(a.model, a.prompts, _fresh(POLICIES[policy]), 6, NEW, [], 0)
        assert calls.calls == 0, "refused after decoding started"
        line = exc.value.one_line()
        assert exc.value.exit_code == 2 and "\n" not in line
        assert policy in line and "policies that work: none" in line
        assert ("always works" if "always" in exact else "always does not either") in line
        return
    if policy == "none":
        out = decode(a.model, a.prompts, _fresh(POLICIES[policy]), 6, NEW, [], 0, keep_logits=True)
        assert [len(r.tokens) for r in out.sequences] == [NEW] * len(LENGTHS)
        return
    _assert_solo(a, _run_exact(a, POLICIES[policy]), f"{arch}/{policy}")


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_capability_table(arch: str) -> None:
    a = _arch(arch)
    exact, windows, moe = EXPECTED[arch]
    caps = capabilities(a.model)
    assert caps.exact_policies == exact
    assert {w for w in caps.windows if w is not None} == windows
    keys = {f.key for f in caps.features}
    assert ("sliding_window" in keys) == bool(windows)
    assert ("moe" in keys) == moe
    assert caps.tested and caps.model_type in TESTED
    verdict = caps.verdict()
    assert verdict.startswith("exact policies supported: " + ", ".join(exact)) and "\n" not in verdict
    for p in EXACT:
        assert (caps.refusal(p) is None) == (p in exact)
    if arch == "gemma2":
        assert {"attn_softcap", "logit_softcap", "sliding_window"} <= keys
    if arch == "gpt_oss":
        assert "attention_sinks" in keys
    if arch in ("bloom", "falcon-alibi"):
        assert {"attention_backend", "alibi"} <= keys
    if arch == "gemma3n":
        assert "kv_sharing" in keys
    if arch in ("qwen3_next", "llama4"):
        assert "cache_layers" in keys


@pytest.mark.parametrize("impl", ["flash_attention_2", "flex_attention"])
def test_other_attention_implementations_keep_always_only(impl: str) -> None:
    a = _arch("mistral")
    config = a.model.config
    before = config._attn_implementation
    try:
        config._attn_implementation = impl
        caps = capabilities(a.model)
    finally:
        config._attn_implementation = before
    assert caps.exact_policies == ("always",)
    assert impl in caps.refusal("invariant") and "always works" in caps.refusal("gate")


GENERATE_ARCHS = ["llama", "qwen2-window", "mistral-w4", "gemma2", "gemma3", "mixtral", "gpt_oss"]


@pytest.mark.parametrize("arch", GENERATE_ARCHS)
def test_solo_and_none_are_what_generate_does(arch: str) -> None:
    """solo_decode is generate at batch size 1, and policy none is generate's left-padded batch, bit for bit."""
    a = _arch(arch)
    model, prompts = a.model, a.prompts
    width = max(LENGTHS)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kw = dict(max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True,
              pad_token_id=0, eos_token_id=None)
    batched = model.generate(input_ids=ids, attention_mask=mask, **kw)
    none = decode(model, prompts, DecodePolicy("none"), len(prompts), NEW, [], 0, keep_logits=True).sequences
    for i in range(len(prompts)):
        assert none[i].tokens == batched.sequences[i, width:].tolist()
        assert all(torch.equal(batched.logits[j][i].float(), none[i].logits[j]) for j in range(NEW))
    for i in (0, len(prompts) - 1):
        one = model.generate(input_ids=torch.tensor([prompts[i]]), **kw)
        assert one.sequences[0, len(prompts[i]):].tolist() == a.solos[i].tokens
        assert all(torch.equal(one.logits[j][0], a.solos[i].logits[j]) for j in range(NEW))


@pytest.mark.parametrize("arch", ["mistral-w4", "gemma2"])
def test_padded_gate_verifies_past_the_window(arch: str) -> None:
    """The paper's padded fast path (not exact: its prefill is batched) on a sliding model: its batch
    cache (cache_ops.batch_cache) keeps the columns the verifier copies out, so every step can be
    verified past the window (generate's own cache has dropped them: row_cache would raise)."""
    a = _arch(arch)
    out = decode_batch(a.model, a.prompts, DecodePolicy("gate", math.inf, fast_path="padded"), NEW, [], 0)
    for r in out:
        assert len(r.tokens) == NEW and r.verified == [False] + [True] * (NEW - 1)


@pytest.mark.parametrize("arch", ["mistral", "gemma2"])
def test_default_probe_path(arch: str) -> None:
    """The public decode() with the default (probed) plan, on sliding-window models."""
    a = _arch(arch)
    for name in ("gate", "invariant"):
        out = decode(a.model, a.prompts, _fresh(POLICIES[name]), 6, NEW, [], 0, keep_logits=True)
        assert [r.tokens for r in out.sequences] == [s.tokens for s in a.solos], name


# --------------------------------------------------------------------------- the matrix can fail


def test_ragged_without_windows_is_not_solo(monkeypatch) -> None:
    """Control: ragged attention over the whole history (the old behaviour) differs from solo."""
    a = _arch("mistral-w4")
    monkeypatch.setattr(ragged, "_layer_window", lambda state, layer_idx, passed: None)
    out = decode_batch(a.model, a.prompts, DecodePolicy("invariant", max_rows=1), NEW, [], 0, keep_logits=True)
    assert any(not torch.equal(r.logits[-1], s.logits[-1].float()) for r, s in zip(out, a.solos))


@pytest.mark.parametrize("shift", [-1, 1])
def test_window_off_by_one_is_not_solo(monkeypatch, shift) -> None:
    """Control: a window one column too short or too long differs from solo (the convention is pinned)."""
    a = _arch("mistral-w4")
    real = ragged._layer_window
    monkeypatch.setattr(ragged, "_layer_window", lambda state, idx, passed: real(state, idx, passed) + shift)
    out = decode_batch(a.model, a.prompts, DecodePolicy("invariant", max_rows=1), NEW, [], 0, keep_logits=True)
    assert any(not torch.equal(r.logits[-1], s.logits[-1].float()) for r, s in zip(out, a.solos))


def test_moe_blocks_run_one_row_at_a_time() -> None:
    """In a ragged step every MoE block sees one row (as a solo step routes one token); restored after."""
    a = _arch("mixtral")
    blocks = ragged.moe_blocks(a.model)
    assert len(blocks) == a.model.config.num_hidden_layers
    seen: list[int] = []

    def tokens_routed(module, args):
        if ragged._rows.get() is not None:  # inside a ragged step
            seen.append(args[0].reshape(-1, args[0].shape[-1]).shape[0])

    handles = [b.gate.register_forward_pre_hook(tokens_routed) for b in blocks]
    try:
        decode_batch(a.model, a.prompts, DecodePolicy("invariant", max_rows=1), 3, [], 0)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == 2 * len(blocks) * len(a.prompts) and set(seen) == {1}  # 2 ragged steps, row by row
    assert all("forward" not in vars(b) for b in blocks)


def test_refused_policies_exit_2_in_the_cli(tmp_path, tiny_tokenizer) -> None:
    """mgaudit verify on a model whose architecture rules the policy out: one error line, exit 2."""
    import json

    from cli_helpers import assert_one_line_error, invoke
    from transformers import BloomConfig, BloomForCausalLM

    tok = tiny_tokenizer
    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=len(tok), hidden_size=64, n_layer=2, n_head=4,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id))
    path = tmp_path / "tiny-bloom"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "how many apples"}) + "\n")
    result = invoke(["verify", str(prompts), "--model", str(path), "--device", "cpu", "--max-new-tokens", "4",
                     "--policy", "invariant"])
    assert_one_line_error(result, "invariant", "always works")
    info = invoke(["model", "info", "--model", str(path), "--device", "cpu"])
    assert info.exit_code == 0, info.output
    report = json.loads(info.stdout)
    assert report["exactness"]["exact_policies"] == ["always"]
    assert "gate" in report["exactness"]["refused"]


def test_model_info_prints_the_verdict(tmp_path, tiny_tokenizer) -> None:
    import json

    from cli_helpers import invoke, stderr_of
    from transformers import MistralConfig, MistralForCausalLM

    tok = tiny_tokenizer
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**_common(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
                                             sliding_window=8))
    path = tmp_path / "tiny-mistral"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    result = invoke(["model", "info", "--model", str(path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "exact policies supported: always, gate, invariant" in stderr_of(result)
    report = json.loads(result.stdout)
    assert report["exactness"]["sliding_windows"] == [8]
    assert report["exactness"]["exact_policies"] == list(EXACT)


# --------------------------------------------------------------------------- transformers' conventions, cache surgery


def test_transformers_sliding_conventions() -> None:
    """Pin what the ragged path reproduces: a sliding cache layer keeps window - 1 columns and the
    sliding mask lets a query see the window - 1 previous positions and itself."""
    from transformers.cache_utils import DynamicSlidingWindowLayer
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    w = 4
    layer = DynamicSlidingWindowLayer(sliding_window=w)
    for n in range(1, 9):
        k = torch.full((1, 1, 1, 2), float(n))
        keys, _ = layer.update(k, k)
        assert keys.shape[-2] == min(n, w)  # what the attention sees: the window
        assert layer.keys.shape[-2] == min(n, w - 1) and layer.get_seq_length() == n
        assert keys[0, 0, :, 0].tolist() == [float(i) for i in range(max(1, n - w + 1), n + 1)]
    mask = sdpa_mask(batch_size=1, q_length=8, kv_length=8, mask_function=sliding_window_causal_mask_function(w),
                     allow_is_causal_skip=False)
    for q in range(8):
        assert mask[0, 0, q].nonzero().flatten().tolist() == list(range(max(0, q - w + 1), q + 1))


def _solo_cache(model, prompt):
    c = new_cache(model)
    with torch.inference_mode():
        forward_last(model, torch.tensor([prompt]), None, torch.arange(len(prompt))[None], c)
    return c


def test_pad_cache_left_with_sliding_layers() -> None:
    a = _arch("gemma2")  # layer 0 sliding (window 8), layer 1 full
    prompts = [a.prompts[1], a.prompts[5]]  # 5 and 21 tokens
    solo = [_solo_cache(a.model, p) for p in prompts]
    assert [layer_span(layer) for layer in solo[1].layers] == [(21 - 7, 21), (0, 21)]
    cache = pad_cache_left(a.model, solo, [5, 21])
    assert all(not getattr(layer, "is_sliding", False) for layer in cache.layers)
    for layer, s0, s1 in zip(cache.layers, solo[0].layers, solo[1].layers):
        assert layer.keys.shape[-2] == 21
        assert torch.equal(layer.keys[0, :, 16:], s0.keys[0]) and not layer.keys[0, :, :16].any()
        held = s1.keys.shape[-2]
        assert torch.equal(layer.keys[1, :, 21 - held:], s1.keys[0])
        assert not layer.keys[1, :, :21 - held].any()  # dropped by the solo sliding layer: outside every window


def test_row_cache_is_the_solo_cache_and_writes_back() -> None:
    a = _arch("gemma2")
    p = a.prompts[5]  # 21 tokens, window 8
    solo = _solo_cache(a.model, p)
    batch = pad_cache_left(a.model, [_solo_cache(a.model, a.prompts[0]), solo], [3, 21])
    one = row_cache(a.model, batch, 1, 0, 21)
    for o, s in zip(one.layers, solo.layers):
        assert type(o) is type(s) and o.get_seq_length() == s.get_seq_length() == 21
        assert torch.equal(o.keys[0, :, -s.keys.shape[-2]:], s.keys[0])
    # the next step on the row cache is the next solo step, bit for bit
    tok, pos = torch.tensor([[7]]), torch.tensor([[21]])
    with torch.inference_mode():
        l1 = forward_last(a.model, tok, None, pos, one)
        l2 = forward_last(a.model, tok, None, pos, solo)
    assert torch.equal(l1, l2)
    # several replayed columns (more than the window keeps) go back into the batch cache
    with torch.inference_mode():
        for j in range(9):
            forward_last(a.model, torch.tensor([[5 + j]]), None, torch.tensor([[22 + j]]), one)
    grown = pad_cache_left(a.model, [_solo_cache(a.model, a.prompts[0]), _solo_cache(a.model, p)], [3, 21])
    for layer in grown.layers:
        layer.keys = torch.cat([layer.keys, layer.keys.new_zeros(2, layer.keys.shape[1], 10, layer.keys.shape[3])], 2)
        layer.values = torch.cat([layer.values, layer.values.new_zeros(2, layer.values.shape[1], 10,
                                                                       layer.values.shape[3])], 2)
    write_columns(grown, one, 1, 10)
    assert columns_equal(grown, one, 1)
    for g, o in zip(grown.layers, one.layers):
        assert torch.equal(g.keys[1, :, -10:], o.keys[0, :, -10:])


def test_row_cache_refuses_columns_a_sliding_layer_dropped() -> None:
    """A generate-style batch cache (sliding layers keep window - 1 columns) cannot give the verifier
    the column it needs once the fast path has appended its own; batch_cache can."""
    a = _arch("mistral-w4")
    prompts = a.prompts[:2]
    from mgaudit.decoding.step import left_pad

    for make, ok in ((new_cache, False), (batch_cache, True)):
        cache = make(a.model)
        ids, mask, pos = left_pad(prompts, 0, "cpu")
        with torch.inference_mode():
            forward_last(a.model, ids, mask, pos, cache)
            mask = torch.cat([mask, torch.ones((2, 1), dtype=mask.dtype)], -1)
            forward_last(a.model, torch.tensor([[9], [9]]), mask, pos[:, -1:] + 1, cache)
        total = cache.get_seq_length()
        if ok:
            one = row_cache(a.model, cache, 1, 0, total - 1)
            assert one.get_seq_length() == total - 1
        else:
            with pytest.raises(RuntimeError, match="no longer holds"):
                row_cache(a.model, cache, 1, 0, total - 1)


# --------------------------------------------------------------------------- the batch-invariant contract


@pytest.mark.parametrize("arch", [a for a, (exact, _, _) in EXPECTED.items() if "invariant" in exact])
def test_batch_invariant_contract_on_every_exact_architecture(arch: str) -> None:
    """Under ``batch-invariant`` every exact architecture's batched output equals each prompt alone
    through the same kernels (packed prefill and padded attention where the model's attention is
    plain sdpa without windows; solo prefill and per-row attention otherwise), bit for bit."""
    from mgaudit.decoding.packed import supported
    from mgaudit.decoding.policies import reference_decode

    a = _arch(arch)
    refs = [reference_decode(a.model, p, NEW, [], contract="batch-invariant", keep_logits=True) for p in a.prompts]
    # decode() probes the machine, so rows share prefill packs and attention calls where the probe allows
    out = decode(a.model, a.prompts, DecodePolicy("invariant", contract="batch-invariant"), len(a.prompts), NEW, [],
                 0, keep_logits=True)
    if supported(a.model):
        assert out.probe["prefill"] is not None and out.probe["attention"] is not None
        assert ("prefill" in out.plan) == out.probe["prefill"]["ok"]
    for i, (r, s) in enumerate(zip(out.sequences, refs)):
        assert r.tokens == s.tokens, (arch, i, supported(a.model))
        assert all(torch.equal(x, y) for x, y in zip(r.logits, s.logits)), (arch, i)
