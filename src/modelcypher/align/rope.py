"""Rotary positions (RoPE) as HF's ``rotate_half`` lays them out: which pairs of a head's units rotate
together, and the Q-K bases that commute with that rotation."""

from __future__ import annotations

import torch


def rope_pairs(head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary pairs ``(i, i + head_dim/2)`` of HF's ``rotate_half``, as two index vectors."""
    i = torch.arange(head_dim // 2)
    return i, i + head_dim // 2


def rope_block(c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``[..., hd, hd]`` matrices acting on each rotary pair ``(x_i, x_j)`` as ``[[c, -s], [s, c]]``:
    a scaled rotation, which commutes with the rotation RoPE applies to that pair."""
    half = c.shape[-1]
    i, j = rope_pairs(2 * half)
    out = torch.zeros(*c.shape[:-1], 2 * half, 2 * half, dtype=c.dtype)
    out[..., i, i], out[..., j, j], out[..., i, j], out[..., j, i] = c, c, -s, s
    return out


def rope_commuting(t: torch.Tensor, rtol: float = 1e-6) -> bool:
    """Whether every matrix of ``t`` is ``rope_block`` of its own entries."""
    t = t.double()
    i, j = rope_pairs(t.shape[-1])
    rebuilt = rope_block(t[..., i, i], t[..., j, i])
    return bool(torch.allclose(t, rebuilt, rtol=0, atol=rtol * float(t.abs().max())))
