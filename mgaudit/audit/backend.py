"""The backend interface, and the pair of backends a job compares.

A backend decodes requests and returns one :class:`~mgaudit.audit.steps.Steps` per request:

* ``alone(requests)``: each request by itself (the reference side, and a candidate of
  another backend);
* ``together(requests, condition)``: one group under a condition (a padded batch, a
  policy, requests in flight, a warm cache), free-running;
* ``forced(requests, condition, references, free)``: the same group teacher-forced on the
  reference's tokens, so each step compares the same prefix, as far as the backend can score
  a given continuation (``scoring()`` says how it was done, and where it could not).

:func:`open_pair` opens the candidate and the reference of a job: the reference is the
candidate's own backend alone, unless another one is named (the local model, or a server).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from ..errors import UsageError
from .conditions import Condition
from .steps import Request, Settings, Steps

#: Tokenized on both sides of a comparison to check that they share a vocabulary.
VOCAB_TEST = "The quick brown fox: 12 + 30 = 42, naïve café. def f(x):\n    return x ** 2"

Log = Callable[[str], None]
Done = Callable[[int], None]


class Backend:
    """What every backend provides (see the module doc)."""

    kind = "backend"
    #: condition kinds this backend runs
    kinds: tuple[str, ...] = ("alone",)
    #: whether reference runs of this backend may come from the reference cache
    cache_references = False
    tokenizer: Any = None

    @property
    def label(self) -> str:
        raise NotImplementedError

    def stack(self) -> dict[str, Any]:
        """The provenance block of what runs (model or engine, versions, device)."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """Everything a run's result depends on (the reference cache's key)."""
        raise NotImplementedError

    def vocabulary(self) -> dict[str, Any]:
        """``{"size", "test_ids"}``: the vocabulary size and the ids of :data:`VOCAB_TEST` (None where
        the backend does not tell)."""
        raise NotImplementedError

    def context(self) -> int | None:
        """The longest prompt + generation this backend takes (None: unknown)."""
        return None

    def alone(self, requests: Sequence[Request], settings: Settings, *, keep_logits: bool = False,
              on_done: Done | None = None) -> list[Steps]:
        """Each request by itself, one after the other."""
        out = []
        for r in requests:
            out.append(self.one(r, settings, keep_logits))
            if on_done:
                on_done(1)
        return out

    def one(self, request: Request, settings: Settings, keep_logits: bool = False) -> Steps:
        """One request decoded alone."""
        raise NotImplementedError

    def together(self, requests: Sequence[Request], condition: Condition, settings: Settings, *,
                 references: Sequence[Steps] | None = None, on_done: Done | None = None) -> list[Steps]:
        """One group under ``condition``, free-running."""
        self.check_condition(condition)
        if condition.kind == "alone":
            return self.alone(requests, settings, on_done=on_done)
        return self.grouped(requests, condition, settings, references, on_done)

    def grouped(self, requests: Sequence[Request], condition: Condition, settings: Settings,
                references: Sequence[Steps] | None, on_done: Done | None) -> list[Steps]:
        """One group under a condition other than ``alone`` (checked to be one this backend runs)."""
        raise NotImplementedError

    def forced(self, requests: Sequence[Request], condition: Condition, settings: Settings,
               references: Sequence[Steps], free: Sequence[Steps]) -> list[Steps]:
        raise NotImplementedError

    def scoring(self) -> dict[str, Any]:
        """How teacher-forced steps were obtained: ``{"route", ...}``."""
        return {"route": "none"}

    def check_condition(self, condition: Condition) -> None:
        if condition.kind not in self.kinds:
            raise UsageError(f"the {self.kind} backend cannot run condition {condition.kind!r}",
                             hint=f"it runs {', '.join(self.kinds)}")

    def close(self) -> None:
        pass


@dataclass
class Pair:
    """The two sides of a job: ``candidate`` and ``reference`` (the same object where the
    reference is the candidate's backend alone)."""

    candidate: Backend
    reference: Backend

    @property
    def cross(self) -> bool:
        """The reference is another backend than the candidate."""
        return self.reference is not self.candidate

    def tokenizer(self) -> Any:
        """The tokenizer both sides' token ids come from (the local model's where there is one)."""
        for b in (self.reference, self.candidate):
            if b.kind == "local":
                return b.tokenizer
        return self.candidate.tokenizer or self.reference.tokenizer

    def check_vocabularies(self) -> dict[str, Any]:
        """Refuse a reference whose vocabulary differs from the candidate's (before any decoding).
        Returns what was compared."""
        if not self.cross:
            return {"checked": "same backend"}
        a, b = self.candidate.vocabulary(), self.reference.vocabulary()
        # the ids of a test string where both sides tokenize; else the vocabulary sizes where both say
        # (a tokenizer's length and a model's vocabulary size can differ by padding: sizes are the fallback)
        what = "test_ids" if a.get("test_ids") is not None and b.get("test_ids") is not None else \
            "size" if a.get("size") is not None and b.get("size") is not None else None
        if what is None:
            return {"checked": None, "note": "not checked: neither a tokenize route nor the vocabulary size on "
                                             "both sides"}
        if a[what] != b[what]:
            detail = (f"{b['size']} vs {a['size']} tokens" if what == "size"
                      else "a test string gets other token ids")
            raise UsageError(f"`reference` {self.reference.label} does not share the candidate's vocabulary "
                             f"({detail}): their token ids cannot be compared",
                             hint="give a reference that serves the same model and tokenizer")
        return {"checked": "token ids of a test string" if what == "test_ids" else "vocabulary size",
                "size": a.get("size") or b.get("size")}


def build_requests(prompts, tokenizer: Any, settings: Settings, context: int | None = None,
                   skip_long: bool = False, log: Log | None = None) -> tuple[list[Request], list[str]]:
    """The requests for a prompt set: token ids through ``tokenizer`` (chat template applied where
    asked), or no ids where there is no tokenizer (a server applies its own template). Prompts that
    do not fit ``context`` with the new tokens are an error, or skipped with ``skip_long``.
    Returns (requests, ids of the skipped prompts)."""
    from ..prompts import encode_prompt, fit_context

    items = list(prompts.prompts)
    if tokenizer is None:
        return [Request(p, i) for i, p in enumerate(items)], []
    ids = [encode_prompt(tokenizer, p, chat=settings.chat) for p in items]
    kept = fit_context([p.id for p in items], [len(x) for x in ids], settings.max_new_tokens, context,
                       skip=skip_long)
    skipped = [items[i].id for i in range(len(items)) if i not in set(kept)]
    if skipped and log:
        log(f"skipped {len(skipped)} of {len(items)} prompts that do not fit the model's context of "
            f"{context} tokens with {settings.max_new_tokens} new tokens")
    return [Request(items[i], i, tuple(ids[i])) for i in kept], skipped


@contextlib.contextmanager
def open_pair(config, *, loaded=None, log: Log | None = None) -> Iterator[Pair]:
    """The candidate and reference backends of a job's configuration (see ``AuditOptions``),
    closed on exit. A server is identified before anything else (an unreachable one fails in
    seconds); the local model loads only where a side needs it."""
    from .local import LocalBackend
    from .remote import EndpointBackend

    log = log or (lambda m: None)
    opened: list[Backend] = []
    local: list[LocalBackend] = []

    def local_backend() -> LocalBackend:
        if not local:
            local.append(LocalBackend(loaded or config.load(log=log)))
            opened.append(local[0])
        return local[0]

    def server(url: str, role: str) -> EndpointBackend:
        from ..endpoint.answers import EndpointError

        try:
            b = EndpointBackend(url, role=role, timeout=config.timeout, retries=config.retries,
                                tokens_only=config.tokens_only, engine_note=config.engine_note)
        except EndpointError as exc:
            if role == "candidate":
                raise
            raise EndpointError(f"`reference`: {exc.message}", hint=exc.hint) from None
        opened.append(b)
        return b

    try:
        ref_spec = config.reference
        candidate_server = server(config.endpoint, "candidate") if config.endpoint else None
        reference_server = server(ref_spec, "reference") if ref_spec not in (None, "local") else None
        tokenizer, tok_info = None, None
        if candidate_server is None or ref_spec == "local":
            lm = local_backend()
            tokenizer = lm.tokenizer
        elif config.tokenizer:
            from ..models import load_tokenizer

            tokenizer, tok_info = load_tokenizer(config.tokenizer, log)
        for b in (candidate_server, reference_server):
            if b is not None:
                b.chat, b.sampling = config.chat, config.sampling()
                b.use_tokenizer(tokenizer, tok_info or (local[0].tokenizer_info() if local else None))
        candidate = candidate_server or local_backend()
        if reference_server is not None:
            reference = reference_server
            reference.cache_references = True
        elif ref_spec == "local":
            reference = local_backend()
        else:
            reference = candidate
        yield Pair(candidate, reference)
    finally:
        for b in reversed(opened):
            b.close()
