"""The backward of softmax(q k^T * scale + bias) v, shared by the fused attention paths: their forwards run
PyTorch's fused kernel, which takes no bias gradient, and their backwards recompute the probabilities a
block of queries at a time."""
from typing import Tuple

import torch


class DenseBias:
    """A bias given as a tensor, (N, M, S), for :func:`attention_backward`: how it enters the probabilities P,
    and the scores' gradient dS = P * (dP - delta), which is also the bias's."""

    def __init__(self, bias: torch.Tensor) -> None:
        self.bias = bias

    def probs_and_grad_scores(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                              delta: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """(P, dS), both (N, M, S), from q (N, M, d), k, v (N, S, d), dO (N, M, d) and delta (N, M)."""
        probs = torch.baddbmm(self.bias.to(q.dtype), q, k.transpose(1, 2), alpha=scale).softmax(-1)
        self.bias = None   # where this object holds the only reference: a (M, S) tensor less while dS is formed
        return probs, torch.bmm(grad_out, v.transpose(1, 2)).sub_(delta[..., None]).mul_(probs)


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias, out: torch.Tensor,
                       grad_out: torch.Tensor, scale: float
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``out = softmax(q k^T * scale + bias) v``, recomputing the probabilities P; the bias
    gradient is dS = P * (dO v^T - rowsum(dO * out)).

    q, out, grad_out: (N, M, d); k, v: (N, S, d); bias: a (N, M, S) tensor, or an object with
    :class:`DenseBias`'s method. Returns dq, dk, dv (in q's dtype) and dS; half precision is
    differentiated in fp32, as the fused kernels accumulate.
    """
    bias = DenseBias(bias) if isinstance(bias, torch.Tensor) else bias
    dtype = q.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    q, k, v, out, grad_out = (t.to(work) for t in (q, k, v, out, grad_out))
    probs, grad_s = bias.probs_and_grad_scores(q, k, v, grad_out, (grad_out * out).sum(-1), scale)
    grad_v = torch.bmm(probs.transpose(1, 2), grad_out)
    del probs
    grad_q = torch.bmm(grad_s, k).mul_(scale)
    grad_k = torch.bmm(grad_s.transpose(1, 2), q).mul_(scale)
    return grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype), grad_s
