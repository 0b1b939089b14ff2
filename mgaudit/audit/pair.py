"""The two sides of a job: the candidate backend and its reference.

:func:`open_pair` opens them from a job's options (:class:`~mgaudit.audit.options.AuditOptions`):
the candidate is the local model or the server ``endpoint`` names; the reference is the
candidate's own backend (each prompt alone), unless ``reference`` names another one (the
local model, or a server). Both sides send the same token ids where a tokenizer is known, and
a reference whose vocabulary differs from the candidate's is refused before any decoding.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

from ..errors import UsageError
from .backend import Backend, Log


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
