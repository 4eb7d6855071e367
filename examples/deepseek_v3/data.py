"""Byte-level corpus and a stateless, layout-independent batch sampler.

    corpus = TokenCorpus.load(None, vocab_size=256)                 # the shipped public-domain text
    tokens = corpus.global_batch(step=7, batch_size=8, seq_len=64, seed=0)   # (8, 65) int64
    mine = shard_rows(tokens, shard=1, num_shards=2)                # (4, 65): rows 4..7

The global batch of a step is a pure function of ``(seed, step)``: every rank draws the same start
offsets and keeps its contiguous slice of rows. So a run's data do not depend on the parallel layout
(a single process sees exactly the union of what the data-parallel shards see, in order), and resuming
at step ``s`` needs no loader state beyond ``s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / "data" / "devils_dictionary.txt"


@dataclass
class TokenCorpus:
    """A 1-D token stream split into train and validation parts (the last ``val_fraction``)."""

    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64
    source: str

    @classmethod
    def load(cls, path: str | Path | None, vocab_size: int, val_fraction: float = 0.05) -> TokenCorpus:
        """Read a text file as bytes, or a token file: ``.npy`` (any integer dtype) or ``.bin`` (uint16).

        ``path=None`` reads the shipped corpus. Raises ValueError when a token id is >= ``vocab_size`` or
        the file is too short to hold a validation split.
        """
        p = Path(path) if path is not None else DEFAULT_CORPUS
        if not p.is_file():
            raise FileNotFoundError(f"data.path={str(p)!r} is not a file")
        if p.suffix == ".npy":
            arr = np.load(p, mmap_mode="r")
            if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(
                    f"data.path={str(p)!r}: a .npy token file must be 1-D integers, got {arr.dtype} "
                    f"of shape {arr.shape}"
                )
        elif p.suffix == ".bin":
            arr = np.memmap(p, dtype=np.uint16, mode="r")
        else:  # any other file: raw bytes, one token per byte
            arr = np.frombuffer(p.read_bytes(), dtype=np.uint8)
        tokens = torch.from_numpy(np.asarray(arr, dtype=np.int64).copy())
        if tokens.numel() == 0:
            raise ValueError(f"data.path={str(p)!r} holds no tokens")
        top = int(tokens.max())
        if top >= vocab_size:
            raise ValueError(f"data.path={str(p)!r} holds token id {top} >= model vocab_size={vocab_size}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"{val_fraction=} must be in (0, 1)")
        n_val = max(1, int(tokens.numel() * val_fraction))
        return cls(train=tokens[:-n_val], val=tokens[-n_val:], source=str(p))

    def global_batch(
        self, step: int, batch_size: int, seq_len: int, seed: int = 0, split: str = "train"
    ) -> torch.Tensor:
        """The whole step's batch: (batch_size, seq_len + 1) int64 windows at seeded random offsets.

        Column ``t`` is the input at position ``t`` and the label of position ``t - 1``.
        """
        stream = self.train if split == "train" else self.val
        span = seq_len + 1
        if stream.numel() < span + 1:
            raise ValueError(
                f"{split} split has {stream.numel()} tokens, fewer than seq_len + 2 = {span + 1}"
            )
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 7919 + (0 if split == "train" else 1))
        starts = torch.randint(0, stream.numel() - span, (batch_size,), generator=gen)
        return stream[starts[:, None] + torch.arange(span)[None, :]]


def shard_rows(batch: torch.Tensor, shard: int, num_shards: int) -> torch.Tensor:
    """Rows ``[shard * B / num_shards, (shard + 1) * B / num_shards)`` of a (B, ...) batch."""
    b = batch.shape[0]
    if b % num_shards != 0:
        raise ValueError(
            f"global batch_size={b} must be divisible by the {num_shards=} data shards (DP x EP)"
        )
    if not 0 <= shard < num_shards:
        raise ValueError(f"{shard=} must be in [0, {num_shards=})")
    per = b // num_shards
    return batch[shard * per : (shard + 1) * per]
