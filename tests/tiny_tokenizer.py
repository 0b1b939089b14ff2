"""A tiny word-level tokenizer built locally, for tests that must not download anything.

``build_tiny_tokenizer()`` returns a ``transformers.PreTrainedTokenizerFast`` with fewer
than 256 tokens: special tokens, chat role tags, digits, punctuation and a couple of
hundred common lowercase English words. Text is lowercased, split on whitespace and
punctuation, numbers are split into single digits, and unknown words map to ``[UNK]``.
Plain encoding prepends ``[BOS]``. With ``chat_template=True`` it carries a simple Jinja
chat template whose role tags are single tokens.
"""

from __future__ import annotations

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[UNK]", "[PAD]", "[BOS]", "[EOS]"]
ROLE_TAGS = ["<|system|>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

PUNCTUATION = list(".,!?;:'\"()-+*/=%$#")
DIGITS = [str(d) for d in range(10)]

WORDS = """
the a an and or but if then so of to in on at by for with from as is are was were be
been it its this that these those there here what which who how why when where do does
did can could will would should may might must not no yes i you he she we they me him
her us them my your his our their one two three four five six seven eight nine ten
many much more most some any all each every few other new old good bad big small long
short first last next same different number numbers list lists string strings word
words sentence function python return returns write code value values sum count
total answer reason reasoning explain brief briefly show step steps give find make
take use get go come see know think want need like help tell ask time day days week
weeks year years hour hours minute minutes money dollar dollars cost price apple
apples box boxes book books page pages student students class school friend friends
water tree house car train bus city home work people person child children man woman
about over under after before again also just only very well now out up down into
than add less half times left has have
""".split()


def _vocab() -> dict[str, int]:
    tokens: list[str] = []
    for tok in SPECIAL_TOKENS + ROLE_TAGS + DIGITS + PUNCTUATION + WORDS:
        if tok not in tokens:
            tokens.append(tok)
    assert len(tokens) <= 256, len(tokens)
    return {tok: i for i, tok in enumerate(tokens)}


def build_tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A fresh tiny tokenizer; ``len(tokenizer)`` is its vocabulary size (<= 256)."""
    vocab = _vocab()
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    # Special tokens and role tags are matched whole, before pre-tokenization.
    tok.add_special_tokens(SPECIAL_TOKENS + ROLE_TAGS)
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A",
        pair="[BOS] $A $B",
        special_tokens=[("[BOS]", vocab["[BOS]"])],
    )
    kwargs = dict(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
    )
    if chat_template:
        kwargs["chat_template"] = CHAT_TEMPLATE
    return PreTrainedTokenizerFast(**kwargs)
