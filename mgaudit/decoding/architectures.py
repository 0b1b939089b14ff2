"""Which model features the exact policies handle: a capability table, and the check
that refuses a model before any decoding when a policy cannot be exact on it.

The exact policies (``always``, ``gate``, ``invariant``) rest on three pieces of
machinery: the ragged decode step (``mgaudit.decoding.ragged``: each row's attention over its
own K/V, MoE blocks one row at a time), the verifier's batch-1 recomputation on a row
cache, and the cache surgery between them (``mgaudit.decoding.cache_ops``). ``none`` is
``generate``'s own batched decode and works on every model.

:data:`FEATURES` says, per feature, which exact policies handle it and how (or why
not). :func:`capabilities` detects a model's features from its config, its class and
the cache layers transformers builds for it; :func:`check_supported` raises
:class:`~mgaudit.errors.UsageError` (exit 2) with one line naming the feature and the
policies that do work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from .policy import EXACT

#: Attention implementations the ragged step reproduces bit for bit (others: verifier only).
RAGGED_ATTENTION = ("sdpa", "eager")

#: Cache layer types the cache surgery handles (transformers' ``layer_types`` names).
CACHE_LAYER_TYPES = ("full_attention", "sliding_attention")

#: Architectures in the test matrix (tests/test_architectures.py): tiny random models of
#: each, all four policies against solo, logits and tokens compared bit for bit.
TESTED = {
    "llama": "Llama",
    "qwen2": "Qwen2 (also with use_sliding_window, mixed full/sliding layers)",
    "qwen3": "Qwen3",
    "mistral": "Mistral (sliding window)",
    "gemma2": "Gemma 2 (eager; alternating sliding/full layers, attention and logit softcapping)",
    "gemma3_text": "Gemma 3 text (alternating sliding/full layers)",
    "phi3": "Phi-3",
    "olmo2": "OLMo 2",
    "gpt_neox": "GPT-NeoX",
    "mixtral": "Mixtral (MoE, sliding window)",
    "qwen2_moe": "Qwen2-MoE (MoE with shared expert)",
    "qwen3_moe": "Qwen3-MoE",
    "gpt_oss": "gpt-oss (eager; attention sinks, MoE, alternating sliding/full layers)",
    "bloom": "BLOOM (ALiBi, own attention code: exact with always only)",
    "falcon": "Falcon with ALiBi (own attention code: exact with always only)",
    "qwen3_next": "Qwen3-Next (linear-attention layers: exact policies refused)",
    "gemma3n_text": "Gemma 3n text (cross-layer KV sharing: exact policies refused)",
    "llama4_text": "Llama 4 text (chunked attention: exact policies refused)",
}


@dataclass(frozen=True)
class FeatureSpec:
    """One row of the capability table."""

    key: str
    title: str
    policies: tuple[str, ...]  # exact policies that handle it
    how: str  # how they handle it, or why the others cannot


FEATURES: dict[str, FeatureSpec] = {f.key: f for f in [
    FeatureSpec("sliding_window", "sliding-window attention", EXACT,
                "ragged attention slices each row's last `window` columns as the solo mask does; the verifier's row "
                "cache has the model's sliding cache layers; the batch cache keeps every column"),
    FeatureSpec("attn_softcap", "attention logit softcapping", EXACT,
                "the ragged step calls the model's own eager attention per row, softcap included"),
    FeatureSpec("logit_softcap", "final logit softcapping", EXACT, "applied per row in the LM head"),
    FeatureSpec("moe", "mixture-of-experts routing", EXACT,
                "the ragged step runs every MoE block one row at a time, as a solo step routes its one token"),
    FeatureSpec("attention_sinks", "attention sinks", EXACT,
                "the model's own eager attention applies the sinks per row"),
    FeatureSpec("attention_backend", "attention code outside transformers' attention interface (e.g. ALiBi in "
                "BLOOM/MPT/Falcon)", ("always",),
                "the ragged step cannot replace such attention; the always verifier runs the model's own batch-1 "
                "forward"),
    FeatureSpec("attn_implementation", "attention implementation", ("always",),
                "ragged attention is checked bit for bit with sdpa and eager only"),
    FeatureSpec("alibi", "ALiBi position bias", ("always",),
                "the bias comes from the padding mask inside the model's own attention code"),
    FeatureSpec("moe_layout", "mixture-of-experts blocks of an unrecognised layout", ("always",),
                "the ragged step finds no `experts` + `gate`/`router` block to run one row at a time"),
    FeatureSpec("kv_sharing", "cross-layer KV sharing", (),
                "layers that reuse another layer's K/V have no cache of their own to copy or pad"),
    FeatureSpec("cache_layers", "cache layer types", (),
                "only full and sliding attention caches are copied, padded and written back"),
    FeatureSpec("bidirectional", "bidirectional attention", (), "not a causal decoder"),
]}


@dataclass
class Feature:
    key: str
    detail: str  # what was found, e.g. "window 8 on layers 0, 2 of 3"

    @property
    def spec(self) -> FeatureSpec:
        return FEATURES[self.key]

    @property
    def policies(self) -> tuple[str, ...]:
        return self.spec.policies

    def describe(self) -> str:
        return f"{self.spec.title} ({self.detail})" if self.detail else self.spec.title


@dataclass
class Capabilities:
    model_type: str
    attn_implementation: str
    layer_types: list[str] = field(default_factory=list)
    windows: list[int | None] = field(default_factory=list)
    features: list[Feature] = field(default_factory=list)

    @property
    def tested(self) -> bool:
        return self.model_type in TESTED

    @property
    def exact_policies(self) -> tuple[str, ...]:
        ok = set(EXACT)
        for f in self.features:
            ok &= set(f.policies)
        return tuple(p for p in EXACT if p in ok)

    @property
    def policies(self) -> tuple[str, ...]:
        return ("none",) + self.exact_policies

    def blocker(self, policy: str) -> Feature | None:
        """The first feature that rules ``policy`` out (None: supported)."""
        if policy == "none":
            return None
        return next((f for f in self.features if policy not in f.policies), None)

    def refusal(self, policy: str) -> str | None:
        f = self.blocker(policy)
        if f is None:
            return None
        works = ", ".join(self.policies)
        always = "always works" if "always" in self.exact_policies else "always does not either"
        return (f"policy {policy} cannot be exact on this {self.model_type} model: {f.describe()} "
                f"({f.spec.how}); policies that work: {works} ({always})")

    def verdict(self) -> str:
        exact = self.exact_policies
        head = f"exact policies supported: {', '.join(exact)}" if exact else "exact policies supported: none"
        refused = [p for p in EXACT if p not in exact]
        parts = [head]
        if refused:
            why = "; ".join(f"{p}: {self.blocker(p).describe()}" for p in refused)
            parts.append(f"refused: {why}")
        handled = [f.describe() for f in self.features if exact and set(f.policies) >= set(exact)]
        if handled:
            parts.append(f"handled by {'/'.join(exact)}: {'; '.join(handled)}")
        parts.append("in the test matrix" if self.tested else "architecture not in the test matrix")
        return " | ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "attn_implementation": self.attn_implementation,
            "layer_types": self.layer_types,
            "sliding_windows": sorted({w for w in self.windows if w is not None}),
            "features": [{"feature": f.key, "detail": f.detail, "exact_policies": list(f.policies)}
                         for f in self.features],
            "exact_policies": list(self.exact_policies),
            "refused": {p: self.refusal(p) for p in EXACT if p not in self.exact_policies},
            "tested": self.tested,
            "verdict": self.verdict(),
        }


def _layers(config) -> tuple[list[str], list[int | None]]:
    """Layer types and windows as transformers' DynamicCache(config=...) decides them."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, kwargs = get_layer_types_and_kwargs(config)
        return list(types), [kw.get("sliding_window") if t == "sliding_attention" else None
                             for t, kw in zip(types, kwargs)]
    except (ImportError, AttributeError, TypeError):
        from transformers import DynamicCache

        cache = DynamicCache(config=config)
        types = ["sliding_attention" if getattr(layer, "is_sliding", False) else "full_attention"
                 for layer in cache.layers]
        return types, [getattr(layer, "sliding_window", None) for layer in cache.layers]


def _span(indices: list[int], n: int) -> str:
    return f"layers {', '.join(map(str, indices))} of {n}" if len(indices) < n else f"all {n} layers"


def capabilities(model) -> Capabilities:
    """Detect the features of ``model`` (a transformers causal LM) that matter for exactness."""
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", None) or getattr(config, "model_type", "") or type(model).__name__
    attn = getattr(config, "_attn_implementation", None) or "eager"
    caps = Capabilities(str(model_type), str(attn))
    add = lambda key, detail="": caps.features.append(Feature(key, detail))  # noqa: E731

    types, windows = _layers(text)
    caps.layer_types, caps.windows = types, windows
    n = len(types)
    other = sorted({t for t in types if t not in CACHE_LAYER_TYPES})
    if "dummy" in other or getattr(text, "num_kv_shared_layers", 0) or getattr(text, "kv_sharing_modes", None):
        add("kv_sharing", "layers without their own cache")
        other = [t for t in other if t != "dummy"]
    if other:
        add("cache_layers", ", ".join(other))
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if sliding:
        ws = sorted({windows[i] for i in sliding})
        add("sliding_window", f"window {'/'.join(map(str, ws))} on {_span(sliding, n)}")

    if getattr(text, "use_bidirectional_attention", False) or getattr(text, "is_causal", True) is False:
        add("bidirectional")
    if getattr(text, "attn_logit_softcapping", None) is not None:
        add("attn_softcap", f"{text.attn_logit_softcapping}")
    if getattr(text, "final_logit_softcapping", None) is not None:
        add("logit_softcap", f"{text.final_logit_softcapping}")

    if not getattr(type(model), "_supports_attention_backend", False):
        add("attention_backend", type(model).__name__)
    elif attn not in RAGGED_ATTENTION:
        add("attn_implementation", attn)
    if getattr(text, "alibi", False) or model_type in ("bloom", "mpt"):
        add("alibi")
    if any(getattr(m, "sinks", None) is not None for m in model.modules()):
        add("attention_sinks")
        if attn != "eager":
            add("attn_implementation", f"{attn} with attention sinks")

    from .ragged import moe_blocks

    experts = (getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None)
               or getattr(text, "n_routed_experts", None))
    blocks = moe_blocks(model)
    if blocks or (experts and experts > 1):
        k = getattr(text, "num_experts_per_tok", None)
        detail = f"{experts} experts" + (f", top-{k}" if k else "") + f", {len(blocks)} MoE blocks"
        if experts and experts > 1 and not blocks:
            add("moe_layout", detail)
        else:
            add("moe", detail)
    return caps


def check_supported(model, policy: str) -> Capabilities:
    """Raise UsageError (exit 2) if ``policy`` cannot be exact on ``model``; else its capabilities."""
    caps = capabilities(model)
    message = caps.refusal(policy)
    if message is not None:
        raise UsageError(message)
    return caps
