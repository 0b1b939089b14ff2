"""An OpenAI-compatible server that decodes with a real (tiny) local model, for audit tests.

Each request is decoded greedily and alone, exactly as the local model decodes the prompt solo
(the same code: :mod:`mgaudit.decoding`), so its answers equal the local reference bit for bit,
until a ``behaviour`` makes it depart while another request is in flight:

* ``exact``: never departs;
* ``near_tie``: at the step whose margin is smallest (if below ``near_tie_below``) it takes the
  runner-up: only rounding-size departures (what batch-order noise does);
* ``anomalous``: at the step whose margin is largest it takes the runner-up: no rounding
  explains that;
* ``seed_ignored``: a sampled request ignores its ``seed`` (each request draws from a fresh
  stream), as a server that samples from one global generator does.

A request with ``temperature`` above 0 is sampled by mgaudit's own sampler with the request's
``seed`` as its draw seed (so a seed-honouring server answers each prompt as the local model
sampled alone does).

After a departure it keeps decoding from the token it took. Routes: ``/v1/models`` (with
llama.cpp's ``meta.n_vocab``), ``/v1/completions`` (token ids or text; ``logprobs: 2``, and
``prompt_logprobs: 2`` as vLLM answers it where ``engine="vllm"``), ``/v1/chat/completions``
(the tokenizer's chat template), ``/tokenize``, and ``/version`` (vLLM) or ``/props``
(llama.cpp). ``tokenize_offset`` shifts the ids ``/tokenize`` returns (a server with another
vocabulary).
"""

from __future__ import annotations

import threading

from http_server import CompletionServer


class ModelServer(CompletionServer):
    def __init__(self, lm, *, behaviour: str = "exact", engine: str = "llama.cpp", delay: float = 0.1,
                 near_tie_below: float = 1.0, tokenize_offset: int = 0):
        super().__init__(delay)
        self.lm, self.behaviour, self.engine = lm, behaviour, engine
        self.near_tie_below, self.tokenize_offset = near_tie_below, tokenize_offset
        self.departures = 0
        self.requests_sampled = 0
        self.model_lock = threading.Lock()

    # ------------------------------------------------------------------ decoding

    def sample(self, ids: list[int], max_tokens: int, body: dict) -> list[tuple[int, list[tuple[int, float]]]]:
        """Sampled steps of ``ids`` with the request's fields (llama.cpp's top_k 0: off)."""
        import torch

        from mgaudit.decoding.sampling import SampleRule, Sampling
        from mgaudit.decoding.stock import solo_decode

        sampling = Sampling(float(body["temperature"]), float(body.get("top_p", 1.0)), body.get("top_k") or None,
                            float(body.get("min_p", 0.0)))
        with self.model_lock, torch.inference_mode():
            self.requests_sampled += 1
            seed = self.requests_sampled * 7919 if self.behaviour == "seed_ignored" else int(body.get("seed", 0))
            run = solo_decode(self.lm.model, ids, max_tokens, self.lm.eos_token_ids, keep_logits=True,
                              rule=SampleRule(sampling, [seed]))
        return [(t, self._top2(lg, t)) for t, lg in zip(run.tokens, run.logits)]

    def decode(self, ids: list[int], max_tokens: int, loaded: bool) -> list[tuple[int, list[tuple[int, float]]]]:
        """Greedy steps of ``ids``: (token taken, [(id, logprob) of the top 2])."""
        import torch

        from mgaudit.decoding.stock import solo_decode

        lm = self.lm
        with self.model_lock, torch.inference_mode():
            solo = solo_decode(lm.model, ids, max_tokens, lm.eos_token_ids, keep_logits=True)
            depart = self._departure(solo.margins) if loaded else None
            if depart is None:
                return [(t, self._top2(lg)) for t, lg in zip(solo.tokens, solo.logits)]
            self.departures += 1
            head = [(t, self._top2(lg)) for t, lg in zip(solo.tokens[:depart], solo.logits[:depart])]
            top = self._top2(solo.logits[depart])
            taken = top[1][0]  # the runner-up
            out = head + [(taken, top)]
            if taken in lm.eos_token_ids or len(out) >= max_tokens:
                return out
            rest = solo_decode(lm.model, ids + [t for t, _ in out], max_tokens - len(out), lm.eos_token_ids,
                               keep_logits=True)
            return out + [(t, self._top2(lg)) for t, lg in zip(rest.tokens, rest.logits)]

    def _departure(self, margins: list[float]) -> int | None:
        if self.behaviour == "near_tie":
            step = min(range(len(margins)), key=lambda t: margins[t])
            return step if margins[step] < self.near_tie_below else None
        if self.behaviour == "anomalous":
            return max(range(len(margins)), key=lambda t: margins[t])
        return None

    @staticmethod
    def _top2(logits, taken: int | None = None) -> list[tuple[int, float]]:
        """The best tokens and their logprobs, as many as a request asks for at most (5); ``taken``: the
        sampled token's own logprob last where it is not among them."""
        import torch

        lp = torch.log_softmax(logits.float(), dim=-1)
        top = torch.topk(lp, 5)
        out = [(int(i), float(v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
        if taken is not None and taken not in dict(out):
            out.append((taken, float(lp[taken])))
        return out

    def score(self, ids: list[int]) -> list:
        """vLLM's prompt_logprobs: per position, the top 2 and the actual token with ranks."""
        import torch

        lm = self.lm
        with self.model_lock, torch.inference_mode():
            out = lm.model(input_ids=torch.tensor([ids]), use_cache=False)
            lp = torch.log_softmax(out.logits[0].float(), dim=-1)
        entries: list = [None]
        for j in range(1, len(ids)):
            row = lp[j - 1]
            order = torch.argsort(row, descending=True)
            ranks = {int(order[r]): r + 1 for r in range(int(min(5, len(order))))}
            e = {str(t): {"logprob": float(row[t]), "rank": r, "decoded_token": ""} for t, r in ranks.items()}
            actual = ids[j]
            if str(actual) not in e:
                e[str(actual)] = {"logprob": float(row[actual]), "rank": int((row > row[actual]).sum()) + 1,
                                  "decoded_token": ""}
            entries.append(e)
        return entries

    # ------------------------------------------------------------------ answers

    def answer(self, body: dict, chat: bool, loaded: bool) -> dict:
        tok = self.lm.tokenizer
        if chat:
            out = tok.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=True)
            ids = [int(i) for i in (out["input_ids"] if hasattr(out, "keys") else out)]
        elif isinstance(body.get("prompt"), list):
            ids = [int(i) for i in body["prompt"]]
        else:
            ids = tok(body.get("prompt", ""), add_special_tokens=True)["input_ids"]
        n = int(body.get("max_tokens", 16))
        steps = self.sample(ids, n, body) if float(body.get("temperature") or 0) > 0 else self.decode(ids, n, loaded)
        k = int(body.get("top_logprobs") or body.get("logprobs") or 2)
        content = [{"id": t, "token": tok.decode([t]), "logprob": dict(top).get(t, top[0][1]),
                    "top_logprobs": [{"id": i, "token": tok.decode([i]), "logprob": v} for i, v in top[:k]]}
                   for t, top in steps]
        finish = "length" if len(steps) >= n else "stop"
        choice = {"index": 0, "finish_reason": finish, "logprobs": {"content": content}}
        text = "".join(c["token"] for c in content)
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        if body.get("prompt_logprobs") and self.engine == "vllm":
            choice["prompt_logprobs"] = self.score(ids)
        return {"object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(steps)}}

    def get(self, path: str) -> tuple[int, dict]:
        if path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": "tiny", "object": "model",
                                                     "meta": {"n_vocab": len(self.lm.tokenizer)}}]}
        if path == "/version" and self.engine == "vllm":
            return 200, {"version": "0.0-test"}
        if path == "/props" and self.engine == "llama.cpp":
            return 200, {"build_info": "test", "total_slots": 8, "default_generation_settings": {"n_ctx": 512}}
        return 404, {"error": "not found"}

    def instant(self, path: str, body: dict) -> tuple[int, dict] | None:
        if path != "/tokenize":
            return None
        ids = self.lm.tokenizer.encode(body.get("content", body.get("prompt", "")), add_special_tokens=False)
        return 200, {"tokens": [i + self.tokenize_offset for i in ids]}

    def post(self, path: str, body: dict, loaded: bool, n_post: int) -> tuple[int, dict]:
        if path in ("/v1/chat/completions", "/v1/completions"):
            return 200, self.answer(body, path.endswith("chat/completions"), loaded)
        return 404, {"error": "not found"}
