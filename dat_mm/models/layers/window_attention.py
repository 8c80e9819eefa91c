import math

import torch
import torch.nn.functional as F
from torch import nn

from .plan import ceil_div, size_cached


def _shift_mask(height: int, width: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """(num_windows, w*w, w*w) additive mask of the shifted windows of a (height, width) map, -100 between
    tokens of different regions."""
    region = torch.zeros(height, width, device=device)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in bounds:
        for ws in bounds:
            region[hs, ws] = label
            label += 1
    region = region.view(height // window, window, width // window, window).transpose(1, 2).reshape(-1, window ** 2)
    return (region[:, :, None] != region[:, None, :]).float() * -100.0


class WindowAttention(nn.Module):
    """Swin window attention over 7x7 windows, optionally on a shifted grid ('L' and 'S' blocks of DAT v1).

    Maps whose size is not a multiple of the window are zero-padded at the bottom/right and the shift mask
    is built on the padded size, as mmdet's Swin does; at 224 input this is the authors' model exactly.
    """

    def __init__(self, channels: int, num_heads: int, window_size: int = 7, shifted: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        # The authors shift by ceil(w / 2), not Swin's w // 2.
        self.shift = math.ceil(window_size / 2) if shifted else 0
        self.proj_qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = nn.Linear(channels, channels)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size),
                                            indexing='ij')).flatten(1)
        rel = coords[:, :, None] - coords[:, None, :] + window_size - 1
        index = rel[0] * (2 * window_size - 1) + rel[1]
        # Recomputed, never loaded: checkpoints carry it but it is a pure function of the window size.
        self.register_buffer('relative_position_index', index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        batch, channels, height, width = x.shape
        w, heads = self.window_size, self.num_heads
        x = x.permute(0, 2, 3, 1)
        x = F.pad(x, (0, 0, 0, ceil_div(width, w) * w - width, 0, ceil_div(height, w) * w - height))
        hp, wp = x.shape[1:3]
        if self.shift:
            x = torch.roll(x, (-self.shift, -self.shift), dims=(1, 2))
        windows = x.reshape(batch, hp // w, w, wp // w, w, channels).transpose(2, 3).reshape(-1, w * w, channels)
        qkv = self.proj_qkv(windows).reshape(windows.shape[0], w * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
        # 4-D, as the fused SDPA kernel takes a mask; it runs where the mask needs no gradient (inference).
        bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)[None]
        if self.shift:
            mask = size_cached(_shift_mask, hp, wp, w, self.shift, x.device).to(bias.dtype)
            bias = (bias + mask[:, None]).repeat(batch, 1, 1, 1)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias.to(qkv.dtype))
        out = self.proj_out(out.transpose(1, 2).reshape(-1, w * w, channels))
        out = out.reshape(batch, hp // w, wp // w, w, w, channels).transpose(2, 3).reshape(batch, hp, wp, channels)
        if self.shift:
            out = torch.roll(out, (self.shift, self.shift), dims=(1, 2))
        return out[:, :height, :width].permute(0, 3, 1, 2)
