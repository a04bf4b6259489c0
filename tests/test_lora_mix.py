"""IDA on LoRA adapters (senseflow/method/lora_mix.py, docs/method.md "IDA with LoRA adapters").

The promise: :func:`mix_lora` gives the best rank-r factors of M = λ·B_F A_F + (1 − λ)·B_G A_G, the exact IDA mix of
two adapters on one base, without forming M: the same singular values and the same best rank-r approximation as an
SVD of the dense M, error 0 when rank(M) ≤ r, and the reported error is Eckart–Young's sqrt(Σ_{i>r} σ_i²)/‖M‖.
"""
from __future__ import annotations

import pytest
import torch

from senseflow.method.lora_mix import mix_lora

M_ROWS, N_COLS, R = 48, 40, 4
LAM = 0.97  # λ of the FLUX and SD3.5 Large presets (docs/method.md §7)


def adapters(seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    """B_F, A_F, B_G, A_G: two random rank-R adapters of one 48 × 40 layer."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g, dtype=dtype)
                 for shape in ((M_ROWS, R), (R, N_COLS), (M_ROWS, R), (R, N_COLS)))


def dense_mix(b_f, a_f, b_g, a_g, lam):
    return lam * b_f @ a_f + (1 - lam) * b_g @ a_g


def best_rank(m: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :r] * s[:r] @ vh[:r]


def test_equals_the_svd_of_the_dense_mix():
    b_f, a_f, b_g, a_g = adapters()
    m = dense_mix(b_f, a_f, b_g, a_g, LAM)
    mix = mix_lora(b_f, a_f, b_g, a_g, LAM)
    assert mix.b.shape == (M_ROWS, R) and mix.a.shape == (R, N_COLS) and mix.b.dtype == torch.float64
    dense_sigma = torch.linalg.svdvals(m)
    torch.testing.assert_close(mix.singular_values, dense_sigma[: 2 * R], rtol=1e-10, atol=1e-10)
    assert float(dense_sigma[2 * R:].max()) < 1e-10 * float(dense_sigma[0])  # rank(M) ≤ 2r
    torch.testing.assert_close(mix.b @ mix.a, best_rank(m, R), rtol=1e-10, atol=1e-10)


def test_reported_error_is_the_dense_truncation_error():
    b_f, a_f, b_g, a_g = adapters(seed=1)
    m = dense_mix(b_f, a_f, b_g, a_g, LAM)
    sigma = torch.linalg.svdvals(m)
    for r in (1, 2, 4, 6, 8):
        mix = mix_lora(b_f, a_f, b_g, a_g, LAM, rank=r)
        dense = float((m - mix.b @ mix.a).norm() / m.norm())
        assert mix.relative_error == pytest.approx(dense, abs=1e-12)
        assert mix.relative_error == pytest.approx(float(sigma[r:].square().sum().sqrt() / sigma.square().sum().sqrt()),
                                                   abs=1e-12)
    assert mix_lora(b_f, a_f, b_g, a_g, LAM, rank=2 * R).relative_error < 1e-12  # rank 2r holds M exactly
    assert mix_lora(b_f, a_f, b_g, a_g, LAM).relative_error > 1e-3  # two random adapters: rank r truncates


@pytest.mark.parametrize("shared", ["column space", "row space"])
def test_exact_when_the_adapters_share_a_column_or_row_space(shared):
    b_f, a_f, b_g, a_g = adapters(seed=2)
    mixing = torch.randn(R, R, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    if shared == "column space":
        b_g = b_f @ mixing  # col(B_G) = col(B_F): M = B_F (λA_F + (1−λ)·mixing·A_G), rank ≤ r
    else:
        a_g = mixing @ a_f  # row(A_G) = row(A_F)
    m = dense_mix(b_f, a_f, b_g, a_g, LAM)
    mix = mix_lora(b_f, a_f, b_g, a_g, LAM)
    assert mix.relative_error < 1e-12
    torch.testing.assert_close(mix.b @ mix.a, m, rtol=1e-10, atol=1e-10)


def test_lambda_one_returns_the_fake_adapter_and_zero_the_generators():
    b_f, a_f, b_g, a_g = adapters(seed=4)
    keep = mix_lora(b_f, a_f, b_g, a_g, 1.0)
    assert keep.relative_error < 1e-12
    torch.testing.assert_close(keep.b @ keep.a, b_f @ a_f, rtol=1e-10, atol=1e-10)
    take = mix_lora(b_f, a_f, b_g, a_g, 0.0)
    assert take.relative_error < 1e-12
    torch.testing.assert_close(take.b @ take.a, b_g @ a_g, rtol=1e-10, atol=1e-10)


def test_mixing_the_factors_is_not_the_ida_update():
    """(λB_F + (1−λ)B_G)(λA_F + (1−λ)A_G) is a rank-r matrix too, so by Eckart–Young it cannot beat the truncation;
    at λ = 0.97 it misses M by about twice as much."""
    b_f, a_f, b_g, a_g = adapters(seed=5)
    m = dense_mix(b_f, a_f, b_g, a_g, LAM)
    naive = (LAM * b_f + (1 - LAM) * b_g) @ (LAM * a_f + (1 - LAM) * a_g)
    naive_error = float((m - naive).norm() / m.norm())
    mix = mix_lora(b_f, a_f, b_g, a_g, LAM)
    assert naive_error > 1.5 * mix.relative_error > 0


def test_float32_adapters_keep_their_dtype():
    b_f, a_f, b_g, a_g = adapters(seed=6, dtype=torch.float32)
    mix = mix_lora(b_f, a_f, b_g, a_g, LAM)
    assert mix.b.dtype == mix.a.dtype == torch.float32
    m = dense_mix(*(t.double() for t in (b_f, a_f, b_g, a_g)), LAM)
    torch.testing.assert_close(mix.b.double() @ mix.a.double(), best_rank(m, R), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case, kwargs, message", [
    ("λ above 1", {"lam": 1.5}, "λ must lie in [0, 1]"),
    ("λ below 0", {"lam": -0.1}, "λ must lie in [0, 1]"),
    ("rank 0", {"rank": 0}, "rank must be at least 1"),
])
def test_bad_arguments_are_refused(case, kwargs, message):
    b_f, a_f, b_g, a_g = adapters()
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        mix_lora(b_f, a_f, b_g, a_g, **{"lam": LAM, **kwargs})


def test_adapters_of_different_layers_are_refused():
    b_f, a_f, b_g, a_g = adapters()
    with pytest.raises(ValueError, match="adapt different layers"):
        mix_lora(b_f, a_f, b_g[:-1], a_g, LAM)
    with pytest.raises(ValueError, match="do not chain"):
        mix_lora(b_f, a_f[:-1], b_g, a_g, LAM)
