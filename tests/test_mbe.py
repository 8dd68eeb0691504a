import math

import numpy as np
import pytest
import torch

from mbe import mbe, patched_mbe


def reference_mbe(Z, alpha):
    """Straight from the definition, in float64 NumPy: eigenvalues of K = Z Zᵀ / tr(Z Zᵀ)."""
    Z = np.asarray(Z, dtype=np.float64)
    K = Z @ Z.T
    lam = np.clip(np.linalg.eigvalsh(K / np.trace(K)), 0, None)
    lam = lam[lam > 1e-15]
    if alpha == 1:
        return float(-(lam * np.log(lam)).sum())
    return float(np.log((lam ** alpha).sum()) / (1 - alpha))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("shape", [(6, 16), (16, 6)])  # N < D uses Z Zᵀ, N > D uses Zᵀ Z
def test_matches_numpy_eigenvalue_reference(alpha, shape):
    torch.manual_seed(0)
    Z = torch.randn(3, *shape) + 0.5 * torch.randn(3, 1, shape[1])  # a shared direction makes the spectrum uneven
    got = mbe(Z, alpha)
    assert got.shape == (3,)
    for i in range(3):
        assert got[i].item() == pytest.approx(reference_mbe(Z[i].numpy(), alpha), abs=2e-4)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_invariances(alpha):
    torch.manual_seed(1)
    Z = torch.randn(12, 20)
    base = mbe(Z, alpha)
    Q, _ = torch.linalg.qr(torch.randn(20, 20))
    assert mbe(7.3 * Z, alpha).item() == pytest.approx(base.item(), abs=1e-4)  # scale
    assert mbe(Z @ Q, alpha).item() == pytest.approx(base.item(), abs=1e-4)  # rotation of the features
    assert mbe(Z[torch.randperm(12)], alpha).item() == pytest.approx(base.item(), abs=1e-4)  # token order


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 3.0])
def test_extremes(alpha):
    rank1 = torch.outer(torch.randn(10), torch.randn(16))
    assert mbe(rank1, alpha).item() == pytest.approx(0.0, abs=1e-4)
    Q, _ = torch.linalg.qr(torch.randn(16, 16))
    orthonormal_rows = Q[:8]
    assert mbe(orthonormal_rows, alpha).item() == pytest.approx(math.log(8), abs=1e-4)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_zero_input_is_zero_with_finite_gradient(alpha):
    Z = torch.zeros(2, 8, 16, requires_grad=True)
    S = mbe(Z, alpha)
    assert torch.equal(S, torch.zeros(2))
    S.sum().backward()
    assert torch.isfinite(Z.grad).all()


def test_values_stay_in_range():
    torch.manual_seed(2)
    Z = torch.randn(50, 8, 32) * torch.logspace(-3, 3, 50)[:, None, None]
    S = mbe(Z)
    assert torch.isfinite(S).all() and (S >= 0).all() and (S <= math.log(8) + 1e-6).all()


def test_bf16_input_and_autocast_compute_in_float32():
    torch.manual_seed(3)
    Z = torch.randn(4, 64, 96).bfloat16()
    exact = mbe(Z.float())
    assert mbe(Z).dtype == torch.float32
    assert torch.allclose(mbe(Z), exact, atol=1e-5)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under_autocast = mbe(Z.float())
    assert torch.allclose(under_autocast, exact, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("shape", [(5, 7), (7, 5)])
def test_gradcheck_float64(alpha, shape):
    torch.manual_seed(4)
    Z = torch.randn(2, *shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: mbe(z, alpha), (Z,))


@pytest.mark.parametrize("shape", [(8, 64), (64, 8)])
def test_alpha2_hand_written_gradient_matches_autograd_of_the_formula(shape):
    torch.manual_seed(5)
    Z = (torch.randn(4, 3, *shape) + torch.randn(4, 1, 1, shape[1])).requires_grad_()
    weights = torch.randn(4, 3)
    (mbe(Z, 2.0) * weights).sum().backward()
    Z_ref = Z.detach().clone().requires_grad_()
    G = Z_ref.mT @ Z_ref  # the other Gram side on purpose: same S_2
    S = 2 * torch.log(G.diagonal(dim1=-2, dim2=-1).sum(-1)) - torch.log(G.square().sum((-2, -1)))
    (S * weights).sum().backward()
    assert torch.allclose(Z.grad, Z_ref.grad, rtol=1e-4, atol=1e-6)
    zero = torch.zeros(2, 8, 16, requires_grad=True)
    mbe(zero, 2.0).sum().backward()
    assert torch.equal(zero.grad, torch.zeros_like(zero))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fused_path_has_the_same_value_and_gradient(dtype, tol):
    """fused=True (the trainer's path under compile=True, here eager) against the batched matmuls, patches of 8 x 24
    with an all-zero patch among them; taller or wider-than-FUSED_MAX_ROWS matrices fall back to the matmuls."""
    torch.manual_seed(6)
    h = torch.randn(3, 2, 32, 24, dtype=dtype) + torch.randn(3, 1, 1, 24, dtype=dtype)
    h[1, 0, :8] = 0
    results = []
    for fused in (False, True):
        x = h.clone().requires_grad_()
        value = patched_mbe(x, 8, 2.0, fused=fused)
        (value * torch.tensor([1.0, -2.0, 0.5], dtype=dtype)).sum().backward()
        results.append((value.detach(), x.grad))
    (v0, g0), (v1, g1) = results
    assert v0.shape == (3,) and torch.allclose(v1, v0, rtol=tol, atol=tol)
    assert torch.allclose(g1, g0, rtol=tol, atol=tol * g0.abs().max().item()) and g1[1, 0, :8].abs().max() == 0
    assert not torch.equal(g1, g0) or dtype == torch.float64  # the fused sums ran: float32 rounds in another order
    Z = torch.randn(2, 40, 48, dtype=torch.float64)  # 40 rows > FUSED_MAX_ROWS, and a tall matrix: the matmul path
    assert torch.equal(mbe(Z, 2.0, fused=True), mbe(Z, 2.0)) and torch.equal(mbe(Z.mT, 2.0, fused=True), mbe(Z.mT, 2.0))
    assert torch.autograd.gradcheck(lambda z: mbe(z, 2.0, fused=True), (torch.randn(2, 5, 7, dtype=torch.float64,
                                                                                      requires_grad=True),))


def test_patched_mbe_is_mean_over_patches_and_batch_per_layer():
    torch.manual_seed(5)
    h = torch.randn(3, 2, 16, 12)  # (n_layer, B, T, D)
    got = patched_mbe(h, 8)
    assert got.shape == (3,)
    for layer in range(3):
        manual = np.mean([mbe(h[layer, b, p * 8:(p + 1) * 8]).item() for b in range(2) for p in range(2)])
        assert got[layer].item() == pytest.approx(manual, abs=1e-5)
    whole = patched_mbe(h, 0)
    assert whole[1].item() == pytest.approx(np.mean([mbe(h[1, b]).item() for b in range(2)]), abs=1e-5)


def test_patched_mbe_rejects_indivisible_length():
    with pytest.raises(ValueError, match="not divisible by mbe_patch_size 5"):
        patched_mbe(torch.randn(2, 16, 8), 5)


def test_centering():
    identical = torch.randn(1, 8).repeat(8, 1)[None]  # (B=1, T=8, D): one patch of identical tokens
    assert patched_mbe(identical, 8, center=True).item() == pytest.approx(0.0, abs=1e-6)
    zero_mean = torch.randn(2, 8, 12)
    zero_mean = zero_mean - zero_mean.mean(dim=1, keepdim=True)
    assert patched_mbe(zero_mean, 8, center=True).item() == pytest.approx(patched_mbe(zero_mean, 8).item(), abs=1e-6)
    shifted = zero_mean + 5.0 * torch.randn(1, 1, 12)  # a shared offset lowers the uncentered entropy only
    assert patched_mbe(shifted, 8).item() < patched_mbe(shifted, 8, center=True).item() - 0.1


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_on_the_test_device_under_bf16_autocast_it_is_float32_and_matches_float64(alpha):
    """MBE on the device the train-level tests use (GAPT_TEST_DEVICE=cuda on a GPU), inside bf16 autocast as in
    training: computed in float32, value and gradient equal to the float64 CPU computation on the same inputs."""
    from conftest import DEVICE
    torch.manual_seed(0)
    Z = (torch.randn(4, 8, 32) + 0.5 * torch.randn(4, 1, 32)).to(torch.bfloat16)  # bf16, as hidden states can be
    Z64 = Z.double().requires_grad_(True)
    Zd = Z.to(DEVICE).requires_grad_(True)
    with torch.autocast(device_type=torch.device(DEVICE).type, dtype=torch.bfloat16):
        got = mbe(Zd, alpha)
    assert got.dtype == torch.float32 and got.device.type == torch.device(DEVICE).type
    ref = mbe(Z64, alpha)
    assert torch.allclose(got.double().cpu(), ref, atol=1e-4)
    got.sum().backward()
    ref.sum().backward()
    assert torch.allclose(Zd.grad.double().cpu(), Z64.grad, atol=1e-3, rtol=1e-2)
