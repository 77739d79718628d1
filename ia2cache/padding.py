"""Padding ragged token-id lists into a batch (shared by collect, distill and evaluate)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad(seqs: Sequence[Sequence[int]], pad_id: int, left: bool = False,
        device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (B, longest). Right padding suits teacher-forced passes:
    causal attention never lets a real token see the pads after it, and positions stay
    0..len-1. Left padding suits ``generate``, which continues from the last column."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(list(s), dtype=torch.long)
        mask[i, cols] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask
