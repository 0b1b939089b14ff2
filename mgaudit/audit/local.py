"""The local model as a backend: solo runs, generate-style padded batches and decode policies.

* ``alone``: the reference of the contract: stock solo decoding (``generate`` at batch
  size 1) for ``solo``, the prompt alone through the batch-invariant kernels for
  ``batch-invariant``;
* ``padded``: a left-padded batch as ``generate`` runs it (:mod:`mgaudit.decoding.stock`);
  against a reference that kept its logits, each step records the largest logit difference;
* ``policy``: :func:`mgaudit.decoding.policies.decode` under a policy; the decode's plan,
  probe evidence and drift events are kept for the report (:attr:`LocalBackend.last_output`).

Teacher forcing (``forced``) feeds each row the reference's tokens; it is always available.
Under seeded sampling (``settings.sampling``) every run of a request draws from the request's
own stream (its draw seed, in ``meta["draw_seed"]``), so a teacher-forced step compares the
token each run samples from the same prefix with the same draw.
"""

from __future__ import annotations

from typing import Any, Sequence

from .backend import VOCAB_TEST, Backend, Done
from .conditions import LOCAL_KINDS, Condition
from .steps import LOCAL_ALTERNATIVES, Request, Settings, Steps


class LocalBackend(Backend):
    kind = "local"
    kinds = LOCAL_KINDS
    cache_references = True  # solo decoding on one machine is deterministic (re-run: bit-identical)

    def __init__(self, lm):
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self.last_output = None  # the DecodeOutput of the last policy run

    @property
    def label(self) -> str:
        return f"the local model {self.lm.name}"

    def stack(self) -> dict[str, Any]:
        return self.lm.provenance()

    def tokenizer_info(self) -> dict[str, Any]:
        return {"name": self.lm.name, "source": self.lm.source}

    def identity(self) -> dict[str, Any]:
        from ..machine import identity

        prov = self.lm.provenance()
        model = {k: v for k, v in prov["model"].items() if k != "device_name"}
        return {"backend": "local", "model": model, "versions": prov["versions"], "machine": identity()}

    def vocabulary(self) -> dict[str, Any]:
        return {"size": len(self.tokenizer),
                "test_ids": list(self.tokenizer.encode(VOCAB_TEST, add_special_tokens=False))}

    def context(self) -> int | None:
        from ..models import model_context

        return model_context(self.lm.model)

    # ------------------------------------------------------------------ runs

    def one(self, request: Request, settings: Settings, keep_logits: bool = False) -> Steps:
        """The prompt alone (the contract's reference), with its best :data:`LOCAL_ALTERNATIVES` tokens per step."""
        import torch

        from ..decoding.policies import reference_decode
        from ..decoding.sampling import sample_rule
        from ..decoding.stock import solo_decode

        ids, eos, seed = list(request.ids), self.lm.eos_token_ids, settings.draw_seed(request)
        meta = _draw_meta([seed])[0]
        if settings.contract == "solo":
            run = solo_decode(self.lm.model, ids, settings.max_new_tokens, eos, keep_logits=True,
                              rule=sample_rule(settings.sampling, [seed]))
        else:
            run = reference_decode(self.lm.model, ids, settings.max_new_tokens, eos, contract=settings.contract,
                                   keep_logits=True, sampling=settings.sampling, seed=seed)
        steps = Steps.of(run, **meta)
        if settings.sampling.greedy:  # the best logits say how far below its own token a candidate's lies
            top = [torch.topk(lg.float(), min(LOCAL_ALTERNATIVES, lg.shape[-1])) for lg in run.logits]
            steps.alternatives = [list(zip(t.indices.tolist(), t.values.tolist())) for t in top]
        if not keep_logits:
            steps.logits = None
        return steps

    def grouped(self, requests: Sequence[Request], condition: Condition, settings: Settings,
                references: Sequence[Steps] | None, on_done: Done | None) -> list[Steps]:
        if condition.kind == "padded":
            out = self._padded(requests, settings, references, forced=False)
            if on_done:
                on_done(len(requests))
            return out
        return self._policy(requests, condition, settings, on_done=on_done)

    def forced(self, requests: Sequence[Request], condition: Condition, settings: Settings,
               references: Sequence[Steps], free: Sequence[Steps]) -> list[Steps]:
        self.check_condition(condition)
        if condition.kind == "padded":
            return self._padded(requests, settings, references, forced=True)
        if condition.kind == "alone":
            return [self._padded([r], settings, [ref], forced=True)[0] for r, ref in zip(requests, references)]
        return self._policy(requests, condition, settings, forced=[ref.tokens for ref in references])

    def scoring(self) -> dict[str, Any]:
        return {"route": "teacher forcing", "requests_per_sequence": None}

    def _padded(self, requests, settings: Settings, references, forced: bool) -> list[Steps]:
        from ..decoding.sampling import sample_rule
        from ..decoding.stock import padded_decode

        refs = references if references is not None and all(r.logits is not None for r in references) else None
        seeds = [settings.draw_seed(r) for r in requests]
        runs = padded_decode(self.lm.model, [list(r.ids) for r in requests], settings.max_new_tokens,
                             self.lm.eos_token_ids, self.lm.pad_token_id,
                             forced=[ref.tokens for ref in references] if forced else None, reference=refs,
                             rule=sample_rule(settings.sampling, seeds))
        width = max(len(r.ids) for r in requests)
        return [Steps.of(run, pad_len=width - len(r.ids), **m) for r, run, m in zip(requests, runs, _draw_meta(seeds))]

    def _policy(self, requests, condition: Condition, settings: Settings, forced=None,
                on_done: Done | None = None) -> list[Steps]:
        from ..decoding.policies import decode

        kwargs = {"forced": forced} if forced is not None else {}
        seeds = [settings.draw_seed(r) for r in requests]
        out = decode(self.lm.model, [list(r.ids) for r in requests], condition.policy, condition.level,
                     settings.max_new_tokens, self.lm.eos_token_ids, self.lm.pad_token_id, on_batch=on_done,
                     sampling=settings.sampling, seeds=None if settings.sampling.greedy else seeds, **kwargs)
        if forced is None:
            self.last_output = out
        return [Steps.of(s, triggers=s.triggers, audits=s.audits, repairs=s.repairs, drift_events=len(s.drift),
                         verified=list(s.verified), **m) for s, m in zip(out.sequences, _draw_meta(seeds))]


def _draw_meta(seeds) -> list[dict[str, Any]]:
    """Each run's draw seed for its meta (nothing when decoding greedily)."""
    return [{} if s is None else {"draw_seed": s} for s in seeds]

