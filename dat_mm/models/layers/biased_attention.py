"""softmax(q k^T * scale + bias) v where the bias is learned, at the speed of the fused SDPA kernels.

PyTorch's fused SDPA kernels take a float mask but no gradient for it: a mask that requires grad sends every
call to the unfused math path (on CPU measured 3x slower than the fused kernel, with a safe-softmax that
adds four passes over the scores). Here the kernel gets the bias detached, and the backward, which the
kernel cannot give, is written out: it returns the bias gradient dS = P * (dO v^T - rowsum(dO * out)).
"""
from typing import Tuple

import torch
import torch.nn.functional as F


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                       out: torch.Tensor, grad_out: torch.Tensor, scale: float
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``out = softmax(q k^T * scale + bias) v``, recomputing the probabilities.

    q, out, grad_out: (N, M, d); k, v: (N, S, d); bias: (N, M, S). Returns dq, dk, dv (in q's dtype) and
    dbias (in bias's); half precision is differentiated in fp32, as the fused kernels accumulate.
    """
    dtype, bias_dtype = q.dtype, bias.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    q, k, v, out, grad_out = (t.to(work) for t in (q, k, v, out, grad_out))
    probs = torch.baddbmm(bias.to(work), q, k.transpose(1, 2), alpha=scale).softmax(-1)
    grad_v = torch.bmm(probs.transpose(1, 2), grad_out)
    delta = (grad_out * out).sum(-1, keepdim=True)
    grad_s = torch.bmm(grad_out, v.transpose(1, 2)).sub_(delta).mul_(probs)
    del probs
    grad_q = torch.bmm(grad_s, k).mul_(scale)
    grad_k = torch.bmm(grad_s.transpose(1, 2), q).mul_(scale)
    return grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype), grad_s.to(bias_dtype)


class BiasedAttention(torch.autograd.Function):
    """Fused SDPA with a bias that takes a gradient. q: (N, M, d); k, v: (N, S, d); bias: (N, M, S)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                scale: float) -> torch.Tensor:
        # The fused CPU kernel wants 4-D inputs; a leading 1 costs nothing.
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=bias.to(q.dtype)[None],
                                             scale=scale)[0]
        ctx.save_for_backward(q, k, v, bias, out)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, bias, out = ctx.saved_tensors
        return (*attention_backward(q, k, v, bias, out, grad_out, ctx.scale), None)
