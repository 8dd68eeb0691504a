"""
The paper's memorization-compression signal (align_interval in train.py): the cosine between the gradients of the CE
and of the MBE, per transformer block and over all of them. A diagnostic beside training, not part of it.
"""

import time

import torch


def gradient_cosines(loss_a, loss_b, blocks):
    """Cosine between the gradients of two losses over the parameters of `blocks` (a list of modules): over all of
    them together, and per block (None where a gradient is zero). Uses autograd.grad: no .grad is touched."""
    per_block_params = [list(block.parameters()) for block in blocks]
    params = [p for ps in per_block_params for p in ps]
    grads_a = torch.autograd.grad(loss_a, params, retain_graph=True, allow_unused=True)
    grads_b = torch.autograd.grad(loss_b, params, allow_unused=True)
    zero = torch.zeros((), dtype=torch.float64, device=params[0].device)

    def dot(g, h):  # a parameter a loss does not reach has a zero gradient (None from autograd)
        return zero if g is None or h is None else (g.double() * h.double()).sum()
    # per parameter: (a·b, a·a, b·b), summed per block
    terms = torch.stack([torch.stack([dot(ga, gb), dot(ga, ga), dot(gb, gb)]) for ga, gb in zip(grads_a, grads_b)])
    per_block = torch.stack([t.sum(0) for t in terms.split([len(ps) for ps in per_block_params])])

    def cosine(ab, aa, bb):
        return float(ab / (aa.sqrt() * bb.sqrt())) if aa > 0 and bb > 0 else None
    return cosine(*per_block.sum(0)), [cosine(*row) for row in per_block]


def gradient_alignment(model, x, y, mbe_loss):
    """The cosine between the gradients of CE and of mbe_loss(hidden) (the mean MBE over the regularised layers) on
    one batch, over the transformer blocks' parameters, as a log record: align_cos (all blocks), align_cos_blocks,
    align_ms. Leaves the RNG streams as they were (fork_rng), so training is not changed."""
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        _, ce, hidden = model(x, y, return_hidden=True)
        cos_all, cos_blocks = gradient_cosines(ce, mbe_loss(hidden), list(model.transformer.h))
    return {"align_cos": cos_all, "align_cos_blocks": cos_blocks, "align_ms": (time.perf_counter() - t0) * 1000}
