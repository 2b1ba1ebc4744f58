"""True CFG in one transformer forward: both branches padded to one text length and stacked on batch."""

from __future__ import annotations

import torch


def stack_cfg_text(cond: torch.Tensor, cond_mask: torch.Tensor | None, uncond: torch.Tensor,
                   uncond_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, Lc, D] and [B, Lu, D] -> ([2B, L, D], bool mask [2B, L]) with L = max(Lc, Lu), cond first."""
    length = max(cond.shape[1], uncond.shape[1])

    def pad(states, mask):
        batch, n, width = states.shape
        out = states.new_zeros(batch, length, width)
        out[:, :n] = states
        m = torch.zeros(batch, length, dtype=torch.bool, device=states.device)
        m[:, :n] = True if mask is None else mask.bool()
        return out, m

    (c, cm), (u, um) = pad(cond, cond_mask), pad(uncond, uncond_mask)
    return torch.cat([c, u]), torch.cat([cm, um])


def combine_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale) -> torch.Tensor:
    """Qwen-Image's true CFG: guided prediction rescaled to the conditional prediction's norm per token.

    `scale` is a float or a per-sample tensor/list (requests batched together may differ).
    """
    if not isinstance(scale, (int, float)):
        scale = torch.as_tensor(scale, dtype=cond.dtype, device=cond.device).view(-1, *([1] * (cond.dim() - 1)))
    comb = uncond + scale * (cond - uncond)
    cond_norm = torch.norm(cond, dim=-1, keepdim=True)
    comb_norm = torch.norm(comb, dim=-1, keepdim=True)
    return comb * (cond_norm / comb_norm)
