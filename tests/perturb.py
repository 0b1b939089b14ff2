"""Perturbations injected into the batched fast path, to show the verifier repairs them."""

from __future__ import annotations

import torch

import mgaudit.decoding.step as step_mod


def is_batched_step(input_ids: torch.Tensor) -> bool:
    return input_ids.shape[0] > 1 and input_ids.shape[1] == 1


def flip_logits_at(monkeypatch, call: int, rule=None, step: int | None = None) -> dict:
    """At the ``call``-th batched decode forward, row 0's runner-up becomes its argmax by 0.01; with
    a sampling ``rule`` (row 0's draw at ``step``), its runner-up by the draw is raised until it is
    sampled instead, at a sampling margin of 0.01 (where that step's margin is a draw's)."""
    orig = step_mod.forward_last
    state = {"calls": 0, "flipped": None}

    def wrapper(model, input_ids, attention_mask, position_ids, cache):
        logits = orig(model, input_ids, attention_mask, position_ids, cache)
        if is_batched_step(input_ids):
            if state["calls"] == call:
                logits = logits.float()  # so that +0.01 is not rounded away (bf16)
                if rule is None:
                    top = torch.topk(logits[0], 2)
                    logits[0, top.indices[1]] = top.values[0] + 0.01
                    state["flipped"] = (int(top.indices[0]), int(top.indices[1]))
                else:
                    p = rule.row(0, step).pick(logits[:1], 0)
                    if p.kind[0] == "sample":
                        logits[0, p.runner_up[0]] += p.top1[0] - p.top2[0] + 0.01
                        state["flipped"] = (p.token[0], p.runner_up[0])
            state["calls"] += 1
        return logits

    monkeypatch.setattr(step_mod, "forward_last", wrapper)
    return state


def after_batched_forward(monkeypatch, touch) -> dict:
    """After every batched decode forward, call ``touch(cache)`` (a perturbation of the fast path
    that stays in the K/V cache); returns a dict counting the calls."""
    orig = step_mod.forward_last
    state = {"calls": 0}

    def wrapper(model, input_ids, attention_mask, position_ids, cache):
        logits = orig(model, input_ids, attention_mask, position_ids, cache)
        if is_batched_step(input_ids):
            touch(cache)
            state["calls"] += 1
        return logits

    monkeypatch.setattr(step_mod, "forward_last", wrapper)
    return state


def rowwise_linear(monkeypatch) -> None:
    """Every ``F.linear`` computes its rows one at a time: a product whose rows depend neither on
    the other rows nor on their position, on any CPU. For the branch of a test that needs
    row-invariant GEMMs (the batch-invariant contract accepted), where this machine's own kernels
    might not give it."""
    real = torch.nn.functional.linear

    def linear(x, w, b=None):
        flat = x.reshape(-1, x.shape[-1])
        if len(flat) <= 1:
            return real(x, w, b)
        return torch.cat([real(flat[i:i + 1], w, b) for i in range(len(flat))]).reshape(*x.shape[:-1], -1)

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
