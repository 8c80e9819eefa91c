import torch
from torch import nn

from ...compat import is_compiling


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW map.

    The wrapped ``nn.LayerNorm`` lives in ``.norm`` so that state-dict keys read
    ``<name>.norm.weight``, as in the authors' checkpoints.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        if is_compiling():
            return self._over_dim1(x)
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def _over_dim1(self, x: torch.Tensor) -> torch.Tensor:
        """The same normalisation over dim 1 in pointwise ops and one reduction, for compiled code: inductor fuses
        them as it does the layer norm, and no permuted view of the map is left for the partitioner to save for
        the backward. Inductor (torch 2.13) cannot order the strides of such a view when the map's sizes are
        symbolic (``ValueRangeError``), and stops."""
        # Same dtypes as the eager path: statistics in float32 at least; CUDA's autocast returns layer_norm's
        # output in float32, CPU's in the input's dtype.
        dtype = torch.float32 if x.is_cuda and torch.is_autocast_enabled() else x.dtype
        var, mean = torch.var_mean(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim=1,
                                   correction=0, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.norm.eps)
        return (y * self.norm.weight[:, None, None] + self.norm.bias[:, None, None]).to(dtype)
