"""IDA on LoRA adapters: the weight mix φ ← λφ + (1 − λ)θ re-factorised to rank r (docs/method.md §7.1).

With both players as low-rank adapters on one shared frozen base W₀ — the fake score F_φ with
φ = W₀ + B_F A_F and the generator G_θ with θ = W₀ + B_G A_G (B: m × r, A: r × n per layer) — IDA's update
φ ← λφ + (1 − λ)θ asks for

    φ' = W₀ + M,   M = λ B_F A_F + (1 − λ) B_G A_G,

a matrix of rank ≤ 2r. Mixing the factors instead, (λB_F + (1 − λ)B_G)(λA_F + (1 − λ)A_G), is not M: it adds the
cross terms λ(1 − λ)(B_F A_G + B_G A_F) and scales each own term by λ² or (1 − λ)².

:func:`mix_lora` returns the best rank-r factors of M without forming the m × n matrix. Write M = B A with the
stacked thin factors B = [λB_F, (1 − λ)B_G] (m × 2r) and A = [A_F; A_G] (2r × n). Thin QR of both,
B = Q_B R_B and Aᵀ = Q_A R_A, gives M = Q_B (R_B R_Aᵀ) Q_Aᵀ; the SVD of the small 2r × 2r core,
R_B R_Aᵀ = U Σ Vᵀ, is then an SVD of M, M = (Q_B U) Σ (Q_A V)ᵀ. Keeping the top r,

    B' = Q_B U_r Σ_r^{1/2},   A' = Σ_r^{1/2} V_rᵀ Q_Aᵀ,

is by Eckart–Young the best rank-r approximation of M in Frobenius norm, with relative error

    ‖M − B'A'‖_F / ‖M‖_F = sqrt(Σ_{i>r} σ_i²) / sqrt(Σ_i σ_i²),

zero when rank(M) ≤ r: for example when one adapter's column space (or row space) holds the other's and r is the
larger of the two ranks, or when λ = 1 and r = r_F. Cost: O((m + n) r² + r³) time and O((m + n) r) memory per
layer, against O(mn·r) for forming M.

It is the IDA step of LoRA training (docs/method.md §7.1, "IDA with LoRA adapters"):
:func:`senseflow.method.adapters.ida_on_adapters` calls it per layer after every generator step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LoraMix", "mix_lora"]


@dataclass(frozen=True)
class LoraMix:
    """The rank-r factors of the mixed adapter (``b``: m × r, ``a``: r × n, in the inputs' dtype), the relative
    Frobenius error ‖M − b·a‖/‖M‖ of the truncation, and all singular values σ of M (descending, length ≤ 2r, in
    the compute dtype)."""

    b: Tensor
    a: Tensor
    relative_error: float
    singular_values: Tensor


def mix_lora(b_fake: Tensor, a_fake: Tensor, b_gen: Tensor, a_gen: Tensor, lam: float,
             rank: int | None = None) -> LoraMix:
    """The best rank-``rank`` factors of M = λ·B_F A_F + (1 − λ)·B_G A_G (module docstring), λ = ``lam``.

    ``b_fake`` (m × r_F), ``a_fake`` (r_F × n): the fake score's adapter; ``b_gen`` (m × r_G), ``a_gen`` (r_G × n):
    the generator's. ``rank`` defaults to r_F (the fake score's adapter keeps its shape). The work runs in float64
    for float64 inputs, else float32; the factors are returned in ``b_fake``'s dtype.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"IDA's λ must lie in [0, 1], got {lam}")
    for name, t in (("b_fake", b_fake), ("a_fake", a_fake), ("b_gen", b_gen), ("a_gen", a_gen)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be a matrix, got shape {tuple(t.shape)}")
    if b_fake.shape[1] != a_fake.shape[0] or b_gen.shape[1] != a_gen.shape[0]:
        raise ValueError(f"adapter factors do not chain: B_F {tuple(b_fake.shape)}, A_F {tuple(a_fake.shape)}, "
                         f"B_G {tuple(b_gen.shape)}, A_G {tuple(a_gen.shape)}")
    if b_fake.shape[0] != b_gen.shape[0] or a_fake.shape[1] != a_gen.shape[1]:
        raise ValueError(f"the two adapters adapt different layers: B_F A_F is {b_fake.shape[0]} × "
                         f"{a_fake.shape[1]}, B_G A_G is {b_gen.shape[0]} × {a_gen.shape[1]}")
    r = b_fake.shape[1] if rank is None else rank
    if r < 1:
        raise ValueError(f"rank must be at least 1, got {r}")

    work = torch.float64 if b_fake.dtype == torch.float64 else torch.float32
    b = torch.cat([lam * b_fake.to(work), (1.0 - lam) * b_gen.to(work)], dim=1)  # m × 2r
    a = torch.cat([a_fake.to(work), a_gen.to(work)], dim=0)  # 2r × n
    q_b, r_b = torch.linalg.qr(b)  # reduced: Q_B m × k, R_B k × 2r
    q_a, r_a = torch.linalg.qr(a.T)  # Q_A n × k', R_A k' × 2r
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # the small core, at most 2r × 2r
    k = min(r, s.numel())
    root = s[:k].sqrt()
    b_new = b.new_zeros(b.shape[0], r)
    a_new = a.new_zeros(r, a.shape[1])
    b_new[:, :k] = (q_b @ u[:, :k]) * root
    a_new[:k] = root[:, None] * (vh[:k] @ q_a.T)
    total = float(s.square().sum())
    error = (float(s[k:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    return LoraMix(b_new.to(b_fake.dtype), a_new.to(b_fake.dtype), error, s)
