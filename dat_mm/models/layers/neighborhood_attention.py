import torch
import torch.nn.functional as F
from torch import nn


def _window_index(length: int, kernel_size: int, device: torch.device) -> torch.Tensor:
    """(length, kernel_size) key positions of each query along one axis.

    NATTEN 0.14.6 semantics: the window starts at clamp(i - k // 2, 0, length - k), so it slides inward at
    the borders instead of reading zero padding.
    """
    pos = torch.arange(length, device=device)
    start = (pos - kernel_size // 2).clamp(0, length - kernel_size)
    return start[:, None] + torch.arange(kernel_size, device=device)


class NeighborhoodAttention(nn.Module):
    """2-D neighborhood attention ('N' blocks of DAT++), pure PyTorch, numerically NATTEN 0.14.6.

    Each query attends to the k x k keys of its (border-clamped) window, with a relative position bias
    ``rpb[head, key_y - query_y + k - 1, key_x - query_x + k - 1]``. Maps smaller than the window are
    zero-padded at the bottom/right before the qkv projection and cropped afterwards.
    """

    def __init__(self, channels: int, num_heads: int, kernel_size: int = 7) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.scale = (channels // num_heads) ** -0.5
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        batch, channels, height, width = x.shape
        k = self.kernel_size
        x = x.permute(0, 2, 3, 1)
        x = F.pad(x, (0, 0, 0, max(0, k - width), 0, max(0, k - height)))
        hp, wp = x.shape[1:3]
        qkv = self.qkv(x).reshape(batch, hp, wp, 3, self.num_heads, -1).permute(3, 0, 4, 1, 2, 5)
        q, key, value = qkv[0] * self.scale, qkv[1], qkv[2]   # (B, heads, Hp, Wp, d)
        iy = _window_index(hp, k, x.device)
        ix = _window_index(wp, k, x.device)
        out = self._attend(q, key, value, iy, ix)
        out = self.proj(out.permute(0, 2, 3, 1, 4).reshape(batch, hp, wp, channels))
        return out[:, :height, :width].permute(0, 3, 1, 2)

    def _bias(self, iy: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:
        """(heads, Hp, Wp, k, k) bias of every query's window."""
        k = self.kernel_size
        by = iy - torch.arange(iy.shape[0], device=iy.device)[:, None] + k - 1
        bx = ix - torch.arange(ix.shape[0], device=ix.device)[:, None] + k - 1
        return self.rpb[:, by[:, None, :, None], bx[None, :, None, :]]

    def _attend(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                iy: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:
        """Reference path: gathers every query's k x k keys and values. Returns (B, heads, Hp, Wp, d)."""
        rows, cols = iy[:, None, :, None], ix[None, :, None, :]
        key_n = key[:, :, rows, cols]                 # (B, heads, Hp, Wp, k, k, d)
        value_n = value[:, :, rows, cols]
        scores = torch.einsum('bhijd,bhijuvd->bhijuv', q, key_n) + self._bias(iy, ix)
        attn = scores.flatten(-2).softmax(-1).view_as(scores)
        return torch.einsum('bhijuv,bhijuvd->bhijd', attn, value_n)
