"""The backward of softmax(q k^T * scale + bias) v, shared by the fused attention paths: their forwards run
PyTorch's fused kernel, which takes no bias gradient, and their backwards recompute the probabilities a
block of queries at a time."""
from typing import Tuple

import torch


class DenseBias:
    """A bias given as a tensor for :func:`attention_backward`: how it enters the probabilities P, and the scores'
    gradient dS = P * (dP - delta), which is also the bias's.

    The bias is (N, M, S), or (N / B, M, S) shared by B consecutive groups of the N batch entries (the images of
    a batch whose tiles share one bias), which is then never copied per image. ``owned``: the bias is this
    object's own buffer, which the scores are added into instead of a new (N, M, S) tensor.
    """

    def __init__(self, bias: torch.Tensor, owned: bool = False) -> None:
        self.bias, self.owned = bias, owned

    def probs_and_grad_scores(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                              delta: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """(P, dS), both (N, M, S), from q (N, M, d), k, v (N, S, d), dO (N, M, d) and delta (N, M)."""
        bias = self.bias.to(q.dtype)
        self.bias = None   # where this object holds the only reference: a (M, S) tensor less while dS is formed
        if bias.shape[0] != q.shape[0]:   # shared by the images: added as a broadcast, never expanded
            scores = torch.bmm(q, k.transpose(1, 2)).view(-1, *bias.shape)
            scores = torch.add(bias, scores, alpha=scale).flatten(0, 1)
        elif self.owned and bias.dtype == q.dtype:
            scores = bias.baddbmm_(q, k.transpose(1, 2), alpha=scale)
        else:
            scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
        del bias
        probs = scores.softmax(-1)
        del scores
        return probs, torch.bmm(grad_out, v.transpose(1, 2)).sub_(delta[..., None]).mul_(probs)

    def take_gradient(self, grad_scores: torch.Tensor) -> None:
        """Called with dS once P is freed; a bias computed from other tensors takes their gradients here."""


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias, out: torch.Tensor,
                       grad_out: torch.Tensor, scale: float
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``out = softmax(q k^T * scale + bias) v``, recomputing the probabilities P; the bias
    gradient is dS = P * (dO v^T - rowsum(dO * out)).

    q, out, grad_out: (N, M, d); k, v: (N, S, d); bias: a tensor as :class:`DenseBias` takes it, or an object
    with its method. Returns dq, dk, dv and dS in the working precision: fp32 for half-precision inputs, as the
    fused kernels accumulate, so that a caller summing the gradients of many calls rounds once, at the end.
    """
    bias = DenseBias(bias) if isinstance(bias, torch.Tensor) else bias
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    q, k, v, out, grad_out = (t.to(work) for t in (q, k, v, out, grad_out))
    probs, grad_s = bias.probs_and_grad_scores(q, k, v, grad_out, (grad_out * out).sum(-1), scale)
    grad_v = torch.bmm(probs.transpose(1, 2), grad_out)
    del probs
    bias.take_gradient(grad_s)
    grad_q = torch.bmm(grad_s, k).mul_(scale)
    grad_k = torch.bmm(grad_s.transpose(1, 2), q).mul_(scale)
    return grad_q, grad_k, grad_v, grad_s
