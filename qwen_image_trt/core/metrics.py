"""Error metrics between a reference and a candidate tensor (pure functions; every stage's checks use them)."""

from __future__ import annotations


def tensor_metrics(ref, got) -> dict:
    """max_abs, rel_l2 (||got - ref|| / ||ref||), cosine and finiteness, in float64."""
    import torch

    ref = torch.as_tensor(ref).detach().cpu().double().flatten()
    got = torch.as_tensor(got).detach().cpu().double().flatten()
    diff = got - ref
    ref_norm = ref.norm().item()
    cos = torch.nn.functional.cosine_similarity(ref, got, dim=0).item()
    return {"max_abs": diff.abs().max().item(), "rel_l2": diff.norm().item() / max(ref_norm, 1e-30), "cosine": cos,
            "finite": bool(torch.isfinite(got).all())}


def l2(a, b=None) -> float:
    import torch

    a = torch.as_tensor(a).detach().cpu().double()
    return float((a - torch.as_tensor(b).detach().cpu().double()).norm() if b is not None else a.norm())


__all__ = ["tensor_metrics", "l2"]
