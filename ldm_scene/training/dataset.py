"""The images a probe run generates: a seed and a prompt per image, split into train, val and test.

An image is identified by its seed alone: the same seed and prompt regenerate the same image, so
nothing is stored but these records. Toy prompts come from the renderer (the scene the seed draws,
as the toy model was trained on); Stable Diffusion prompts come from a text file, one per line
(the paper used LAION-Aesthetics captions).

The split depends only on the seeds: images are ordered by a keyed hash of their seed, the first
``floor(n * train_fraction)`` are the fitting images and the rest the test images (the paper's
617 images split 246 / 371 with the default 0.4). Of the fitting images, the first
``round(n_fit * val_fraction)`` in hash order are the validation part, on which the ridge penalty
and the best site per step are chosen; the probes are then refit on train and val together.

Sharding (``accelerate launch`` over several GPUs) deals the records out round-robin by index, so
each process gets a balanced share of train, val and test images.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .. import bundle

__all__ = [
    "SPLITS",
    "Record",
    "Shard",
    "toy_prompt",
    "read_prompts",
    "make_records",
    "split_counts",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    """One image of a run: its position in the run, its seed (noise and identity), prompt and split."""

    index: int
    seed: int
    prompt: str
    split: str

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.index < 0 or self.seed < 0:
            raise ValueError(f"index and seed must be >= 0, got {self.index}, {self.seed}")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"record {self.index} (seed {self.seed}) has an empty prompt")

    @property
    def fits(self) -> bool:
        """Whether the image is used for fitting (train or val), not for testing."""
        return self.split != "test"


@dataclass(frozen=True)
class Shard:
    """This process's share of the images: every ``world``-th record starting at ``rank``."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"need 0 <= rank < world, got rank={self.rank}, world={self.world}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def select(self, records: Iterable[Record]) -> list[Record]:
        """The records this shard processes, in run order."""
        return [r for r in records if r.index % self.world == self.rank]

    @property
    def tag(self) -> str:
        """A file-name tag for this shard's partial results (``rank0of1``)."""
        return f"rank{self.rank}of{self.world}"


def toy_prompt(seed: int) -> str:
    """The renderer's caption for the scene ``seed`` draws (``"a red cone"``)."""
    return bundle.toy_prompt(seed)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file, one per line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts (one per line)")
    return prompts


def _split_key(seed: int) -> bytes:
    # A fixed keyed hash: the split of a seed never depends on the Python process or on N's order.
    return hashlib.blake2b(int(seed).to_bytes(8, "little"), key=b"ldm-scene-split", digest_size=8).digest()


def split_counts(n: int, train_fraction: float = 0.4, val_fraction: float = 0.2) -> tuple[int, int, int]:
    """``(n_train, n_val, n_test)`` for ``n`` images (train excludes val; both fit the probes)."""
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_fit = int(math.floor(n * train_fraction + 1e-9))
    n_val = int(round(n_fit * val_fraction))
    if val_fraction > 0 and n_fit >= 2:
        n_val = min(max(n_val, 1), n_fit - 1)
    return n_fit - n_val, n_val, n - n_fit


def make_records(
    n: int,
    seed: int = 0,
    prompts: Sequence[str] | None = None,
    train_fraction: float = 0.4,
    val_fraction: float = 0.2,
) -> list[Record]:
    """The ``n`` records of a run: seeds ``seed .. seed + n - 1``, prompts, and the split.

    ``prompts=None`` takes each seed's toy-renderer prompt; a list is used in order and cycled
    when shorter than ``n``. Needs at least 3 images (a train, a val and a test image).
    """
    if n < 3:
        raise ValueError(f"need at least 3 images (train, val and test), got n={n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    n_train, n_val, n_test = split_counts(n, train_fraction, val_fraction)
    if min(n_train, n_test) < 1 or (val_fraction > 0 and n_val < 1):
        raise ValueError(
            f"n={n} with train_fraction={train_fraction}, val_fraction={val_fraction} gives "
            f"{n_train} train, {n_val} val and {n_test} test images; each needs at least one"
        )
    if prompts is not None and not prompts:
        raise ValueError("prompts is empty")
    seeds = [seed + i for i in range(n)]
    order = sorted(range(n), key=lambda i: _split_key(seeds[i]))
    split = {}
    for rank, i in enumerate(order):
        split[i] = "val" if rank < n_val else "train" if rank < n_val + n_train else "test"
    records = []
    for i, s in enumerate(seeds):
        prompt = toy_prompt(s) if prompts is None else prompts[i % len(prompts)]
        records.append(Record(i, s, prompt, split[i]))
    return records
