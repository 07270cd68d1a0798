"""What a model can read: its vocabulary, example prompts it knows, and warnings for words it does not.

A word-level tokenizer (the toy and tiny models') has a closed vocabulary, which the page lists
under the prompt; an unknown word falls apart into letters and means nothing to the model, so it
is warned about (never refused). SD's CLIP BPE (49,408 tokens) has an open vocabulary: nothing is
listed or checked.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Sequence

from .. import bundle

log = logging.getLogger(__name__)

#: A tokenizer with at most this many tokens is word-level (the toy and tiny models').
WORD_LEVEL_MAX_TOKENS = 1000


def _one_token(tokenizer: Any, word: str) -> bool:
    return len(tokenizer(word, add_special_tokens=False).input_ids) == 1


def vocabulary(tokenizer: Any) -> tuple[str, ...]:
    """The words a word-level model knows, for the page to list; ``()`` for an open vocabulary.

    A word-level tokenizer also holds every letter, so its token list is not a word list: the
    words are the toy world's prompt words that this tokenizer keeps whole.
    """
    if len(tokenizer) > WORD_LEVEL_MAX_TOKENS:
        return ()
    return tuple(w for w in bundle.toy_prompt_words()["prompt"] if _one_token(tokenizer, w))


def _quoted(words: Sequence[str]) -> str:
    return ", ".join(f"'{w}'" for w in words)


def prompt_warnings(vocab: Sequence[str], prompt: Any) -> list[str]:
    """Why a prompt may not mean what it says to a model with vocabulary ``vocab`` (never a refusal).

    Place words (toy prompts only say what the object is; the noise decides where) and words
    outside the vocabulary. Nothing for an open vocabulary or for non-text input.
    """
    if not vocab or not isinstance(prompt, str):
        return []
    place_words = bundle.toy_prompt_words()["place"]
    words = list(dict.fromkeys(re.findall(r"[^\W_]+", prompt.lower())))
    place = [w for w in words if w in place_words]
    unknown = [w for w in words if w not in vocab and w not in place_words]
    out = []
    if place:
        out.append(f"{_quoted(place)}: this model's prompts never say where the object is; the noise decides "
                   "its place, so place words are ignored at best.")
    if unknown:
        out.append(f"{_quoted(unknown)} {'is' if len(unknown) == 1 else 'are'} not in this model's vocabulary "
                   f"({', '.join(vocab)}); the model cannot read {'it' if len(unknown) == 1 else 'them'}.")
    return out


def examples(path: Path, tokenizer: Any, steps: int, guidance: float) -> list[list[Any]]:
    """``[prompt, seed, steps, guidance]`` rows from ``path`` (a JSON list) that the tokenizer can read.

    A prompt is offered only if every word is one token, so the toy model gets its own
    vocabulary's prompts and SD the photographic ones. Steps follow the loaded probes (readouts
    exist only at the length they were fit for).
    """
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        log.warning("examples: cannot read %s: %s", path, type(err).__name__)
        return []
    if not isinstance(rows, list):
        log.warning("examples: %s is not a JSON list", path)
        return []
    out = []
    for row in rows:
        if not isinstance(row, dict):
            continue
        prompt = str(row.get("prompt", ""))
        words = prompt.lower().split()
        if not words or not all(_one_token(tokenizer, w) for w in words):
            continue
        try:
            out.append([prompt, int(row.get("seed", 0)), steps, float(row.get("guidance", guidance))])
        except (TypeError, ValueError):
            continue
    return out
