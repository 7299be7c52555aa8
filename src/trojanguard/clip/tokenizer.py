"""A word-level tokenizer for the tiny CLIP of the zoo: lower-case words to ids, a start and an end token, padded to
a fixed context length. Real CLIP models bring their own tokenizer (open_clip's ``get_tokenizer``, Hugging Face's
``CLIPTokenizer``); this one exists so that the zoo needs no download."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

SPECIAL = ("<pad>", "<start>", "<end>", "<unknown>")
PAD, START, END, UNKNOWN = range(len(SPECIAL))
DEFAULT_CONTEXT = 12


def words(text: str) -> list[str]:
    """The lower-case words of ``text`` (letters and digits; punctuation dropped)."""
    return re.findall(r"[a-z0-9]+", text.lower())


class WordTokenizer:
    """``tokenizer(texts) -> (N, context_length)`` int64 ids: ``<start> words… <end> <pad>…``; words beyond the
    context are cut (the end token is kept), unknown words map to ``<unknown>``."""

    def __init__(self, vocabulary: Sequence[str], context_length: int = DEFAULT_CONTEXT):
        if context_length < 3:
            raise ValueError(f"context_length: expected at least 3 (start, a word, end), got {context_length}")
        self.vocabulary = list(SPECIAL) + [w for w in dict.fromkeys(vocabulary) if w not in SPECIAL]
        self.index = {w: i for i, w in enumerate(self.vocabulary)}
        self.context_length = context_length

    @classmethod
    def from_texts(cls, texts: Iterable[str], context_length: int = DEFAULT_CONTEXT) -> WordTokenizer:
        """A tokenizer whose vocabulary is every word of ``texts`` (sorted, so the ids do not depend on order)."""
        return cls(sorted({w for text in texts for w in words(text)}), context_length)

    def __len__(self) -> int:
        return len(self.vocabulary)

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.index.get(w, UNKNOWN) for w in words(text)][: self.context_length - 2]
            out[row, : len(ids) + 2] = torch.tensor([START, *ids, END])
        return out

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """The words of each row of ids (special tokens left out)."""
        return [" ".join(self.vocabulary[i] for i in row.tolist() if i >= len(SPECIAL)) for row in tokens]
