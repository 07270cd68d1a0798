"""A word-level CLIP tokenizer built offline, for the tiny test models and the toy model's text encoder."""
from __future__ import annotations

from collections import Counter
from typing import Sequence

__all__ = ["word_tokenizer"]


def word_tokenizer(words: Sequence[str], max_length: int):
    """Build a CLIP tokenizer, offline, whose BPE merges make each of ``words`` one token.

    The vocabulary also holds every lowercase letter and digit, so any prompt tokenizes (unknown
    words fall apart into letters). Used by the tiny test models and the toy model's text encoder.
    The same words always give the same ids and merges, in any process: a text encoder trained
    with one build must read the same ids from the next.
    """
    from transformers import CLIPTokenizer

    # Plain BPE over the word list with ties broken by the pair itself. (tokenizers' BpeTrainer
    # breaks ties in hash order, so its ids and merge order changed from one call to the next.)
    # Merges learned in this order re-segment every training word into the single token it became.
    words = sorted(set(w.lower() for w in words))
    segments = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in words if w]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for seg in segments for pair in zip(seg, seg[1:]))
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        segments = [_merge_pair(seg, best) for seg in segments]
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789").union(*words))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _merge_pair(seg: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(seg):
        if i + 1 < len(seg) and (seg[i], seg[i + 1]) == pair:
            out.append(seg[i] + seg[i + 1])
            i += 2
        else:
            out.append(seg[i])
            i += 1
    return tuple(out)
