"""
Matrix-based entropy (MBE) of representation matrices, batched.

For Z with N rows (tokens) and D columns (features), K = Z Zᵀ / tr(Z Zᵀ) has non-negative eigenvalues λ that sum
to 1, and the matrix-based Rényi entropy of order α is (paper, Sec. 2; Giraldo et al. 2014)

    S_α(Z) = log(Σ_i λ_i^α) / (1 − α),        S_1(Z) = −Σ_i λ_i log λ_i  (the limit α → 1).

It lies in [0, log rank(Z)]: 0 when every row points the same way, log N when the rows are orthogonal and of equal
length. Z Zᵀ (N×N) and Zᵀ Z (D×D) share their non-zero eigenvalues, so we always use the smaller one. For α = 2 no
eigendecomposition is needed: Σ λ² = ‖G‖_F² / tr(G)², so S_2 = 2·log tr(G) − log ‖G‖_F².
"""

import functools
import math

import torch
from torch.autograd.function import once_differentiable

# a Gram matrix whose trace is below this is treated as all-zero: entropy 0, gradient 0
_TINY_TRACE = 1e-30
# fused=True computes Gram matrices of at most this many rows as broadcast products and sums (see _Renyi2)
FUSED_MAX_ROWS = 32


def _small_gram(Z):
    """Z Zᵀ of each matrix in Z (..., n, D) as one product-and-sum: (..., n, 1, D) * (..., 1, n, D) summed over D."""
    return (Z.unsqueeze(-2) * Z.unsqueeze(-3)).sum(-1)


class _Renyi2(torch.autograd.Function):
    """S_2 = 2·log tr(G) − log ‖G‖_F² of each matrix in Z (..., N, D), G its smaller Gram matrix, with the gradient
    written out: dS/dZ = 4·Z / tr(G) − 4·G Z / ‖G‖_F² (G = Z Zᵀ; Z G for G = Zᵀ Z). One matmul forward and one
    backward; autograd through the Gram product would take two backward. An all-zero Z gives 0 and gradient 0.

    fused=True (wide matrices of at most FUSED_MAX_ROWS rows, the MBE patches): the same math with G = Z Zᵀ and G Z
    written as broadcast products and sums instead of batched matmuls, so that torch.compile makes each of the
    forward and the backward one reduction that reads Z once (a GPU's batched matmul of 8 x 768 patches is far from
    its memory-traffic floor, docs/performance.md). Eager, the product materialises n copies of Z: compiled use only."""

    @staticmethod
    def forward(ctx, Z, fused=False):
        wide = Z.shape[-2] <= Z.shape[-1]
        fused = fused and wide and Z.shape[-2] <= FUSED_MAX_ROWS
        G = _small_gram(Z) if fused else Z @ Z.mT if wide else Z.mT @ Z  # (..., m, m) with m = min(N, D)
        trace = G.diagonal(dim1=-2, dim2=-1).sum(-1)
        frob2 = G.square().sum((-2, -1))
        nonzero = trace > _TINY_TRACE
        trace, frob2 = (torch.where(nonzero, x, torch.ones_like(x)) for x in (trace, frob2))
        ctx.save_for_backward(Z, G, trace, frob2, nonzero)
        ctx.wide, ctx.fused = wide, fused
        return torch.where(nonzero, 2 * torch.log(trace) - torch.log(frob2), torch.zeros_like(trace))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_S):
        Z, G, trace, frob2, nonzero = ctx.saved_tensors
        if ctx.fused:  # (G Z)[i, d] = Σ_j G[i, j] Z[j, d] as a product and a sum over j
            GZ = (G.unsqueeze(-1) * Z.unsqueeze(-3)).sum(-2)
        else:
            GZ = G @ Z if ctx.wide else Z @ G
        grad_S = torch.where(nonzero, grad_S, torch.zeros_like(grad_S))
        a, b = (4 * grad_S / trace)[..., None, None], (4 * grad_S / frob2)[..., None, None]
        return a * Z - b * GZ, None


def mbe(Z, alpha=2.0, fused=False):
    """Matrix-based α-entropy (natural log) of each matrix in Z (..., N, D); returns a tensor of shape (...).
    fused=True: α=2 on small wide matrices as reductions that torch.compile fuses (_Renyi2); the same value.

    Computed in float32 (float64 stays float64) with autocast disabled, whatever the input dtype: a Gram matmul under
    bf16 autocast runs in bf16 and is off by ~0.1 nats. An all-zero matrix has entropy 0 and a finite gradient.
    """
    if alpha <= 0:
        raise ValueError(f"mbe: alpha must be > 0, got {alpha}")
    with torch.autocast(device_type=Z.device.type, enabled=False):
        Z = Z.double() if Z.dtype == torch.float64 else Z.float()
        N, D = Z.shape[-2], Z.shape[-1]
        if alpha == 2:
            S = _Renyi2.apply(Z, fused)
        else:
            G = Z @ Z.mT if N <= D else Z.mT @ Z  # (..., m, m) with m = min(N, D)
            trace = G.diagonal(dim1=-2, dim2=-1).sum(-1)
            nonzero = trace > _TINY_TRACE
            safe_trace = torch.where(nonzero, trace, torch.ones_like(trace))
            lam = torch.linalg.eigvalsh(G / safe_trace[..., None, None]).clamp_min(0)
            # eigenvalues under the rounding noise of the Gram matrix (numpy.linalg.matrix_rank's tolerance; λ_max <= 1)
            # count as 0: their λ^α would add noise for α < 1, and the gradients of λ^α, λ log λ blow up at 0
            positive = lam > lam.shape[-1] * torch.finfo(lam.dtype).eps
            safe_lam = torch.where(positive, lam, torch.ones_like(lam))
            if alpha == 1:
                S = -torch.where(positive, lam * torch.log(safe_lam), torch.zeros_like(lam)).sum(-1)
            else:
                power_sum = torch.where(positive, safe_lam ** alpha, torch.zeros_like(lam)).sum(-1)
                S = torch.log(torch.where(nonzero, power_sum, torch.ones_like(power_sum))) / (1 - alpha)
            S = torch.where(nonzero, S, torch.zeros_like(S))
        return S.clamp(0.0, math.log(min(N, D)))


def patched_mbe(h, patch_size, alpha=2.0, center=False, fused=False):
    """Mean MBE over consecutive patches of patch_size tokens.

    h: (..., B, T, D). Each run of patch_size tokens of a sequence is one matrix (the paper's code uses 8);
    patch_size=0 takes the whole sequence. Returns the mean over patches and over the batch dim B: shape (...),
    so the stacked hidden states (n_layer, B, T, D) give one value per layer, in one batched call.
    center=True subtracts each patch's mean token first (then a patch of identical tokens has entropy 0).
    fused=True: see mbe(); for torch.compile (compiled_patched_mbe()), which the trainer uses when compile=True.
    """
    T, D = h.shape[-2], h.shape[-1]
    P = T if patch_size == 0 else patch_size
    if P <= 0 or T % P != 0:
        raise ValueError(f"patched_mbe: sequence length {T} is not divisible by mbe_patch_size {patch_size}; "
                         f"pick a patch size that divides it (or 0 for the whole sequence)")
    patches = h.reshape(*h.shape[:-2], T // P, P, D)  # (..., B, T/P, P, D)
    if center:
        patches = patches - patches.mean(dim=-2, keepdim=True)
    return mbe(patches, alpha, fused).mean(dim=(-2, -1))  # mean over patches, then over the batch


def _fused_when_compiled(h, patch_size, alpha=2.0, center=False):
    # fused only while torch.compile traces: should dynamo ever fall back to eager (its recompile limit), the eager
    # broadcast product would hold patch_size copies of the hidden states
    return patched_mbe(h, patch_size, alpha, center, fused=torch.compiler.is_compiling())


@functools.cache
def compiled_patched_mbe():
    """patched_mbe with fused=True under torch.compile (made on first use: importing torch.compile costs seconds),
    compiled on its first call and again for a new shape or grad mode."""
    return torch.compile(_fused_when_compiled)
