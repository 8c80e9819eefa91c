import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn


def _window_index(length: int, kernel_size: int, device: torch.device) -> torch.Tensor:
    """(length, kernel_size) key positions of each query along one axis.

    NATTEN 0.14.6 semantics: the window starts at clamp(i - k // 2, 0, length - k), so it slides inward at
    the borders instead of reading zero padding.
    """
    pos = torch.arange(length, device=device)
    start = (pos - kernel_size // 2).clamp(0, length - kernel_size)
    return start[:, None] + torch.arange(kernel_size, device=device)


def _tiles(length: int, kernel_size: int, tile: int, device: torch.device):
    """One axis cut into query tiles, each with the key region that holds all its windows.

    Returns (keys (T, R), bias index (T, tile, R)), where the bias index is ``key - query + k - 1`` for keys
    inside the query's window and -1 outside it. The last tile may run past the map; its extra queries are
    cropped away afterwards.
    """
    n_tiles = -(-length // tile)
    region = min(tile + kernel_size - 1, length)
    starts = torch.arange(n_tiles, device=device) * tile
    queries = starts[:, None] + torch.arange(tile, device=device)
    keys = (starts - kernel_size // 2).clamp(0, length - region)[:, None] + torch.arange(region, device=device)
    window = (queries - kernel_size // 2).clamp(0, length - kernel_size)[:, :, None]
    key = keys[:, None, :]
    inside = (key >= window) & (key < window + kernel_size)
    return keys, torch.where(inside, key - queries[:, :, None] + kernel_size - 1, -1)


def _kinds(bias_index: torch.Tensor):
    """The distinct bias patterns among one axis' tiles (T, tile, R): all interior tiles share one, the
    border tiles add two or three. Returns (patterns (U, tile, R), each tile's pattern (T,))."""
    patterns, kind = torch.unique(bias_index.flatten(1), dim=0, return_inverse=True)
    return patterns.view(-1, *bias_index.shape[1:]), kind


def _shortfall(length, kernel_size: int):
    """max(0, kernel_size - length). Under an ONNX trace ``length`` is a 0-d tensor, and Python's max would
    freeze the branch taken at the export size; the clamp keeps the padding a function of the input."""
    if isinstance(length, torch.Tensor):
        return (kernel_size - length).clamp(min=0)
    return max(0, kernel_size - length)


class NeighborhoodAttention(nn.Module):
    """2-D neighborhood attention ('N' blocks of DAT++), pure PyTorch, numerically NATTEN 0.14.6.

    Each query attends to the k x k keys of its (border-clamped) window, with a relative position bias
    ``rpb[head, key_y - query_y + k - 1, key_x - query_x + k - 1]``. Maps smaller than the window are
    zero-padded at the bottom/right before the qkv projection and cropped afterwards.
    """

    def __init__(self, channels: int, num_heads: int, kernel_size: int = 7, reference: bool = False) -> None:
        super().__init__()
        # The reference path gathers every query's window (49 copies of k and v); the default path attends
        # tiles of queries to the key region around them, about 3.4 copies.
        self.reference = reference
        self.tile = kernel_size
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
        x = F.pad(x, (0, 0, 0, _shortfall(width, k), 0, _shortfall(height, k)))
        hp, wp = x.shape[1:3]
        qkv = self.qkv(x).reshape(batch, hp, wp, 3, self.num_heads, -1).permute(3, 0, 4, 1, 2, 5)
        q, key, value = qkv[0] * self.scale, qkv[1], qkv[2]   # (B, heads, Hp, Wp, d)
        if self.reference:
            out = self._attend(q, key, value)
        elif torch.is_grad_enabled() and qkv.requires_grad:
            # The tiles' gathered regions, bias and attention are recomputed in backward, not stored.
            out = cp.checkpoint(self._attend_tiled, q, key, value, use_reentrant=False)
        else:
            out = self._attend_tiled(q, key, value)
        out = self.proj(out.permute(0, 2, 3, 1, 4).reshape(batch, hp, wp, channels))
        return out[:, :height, :width].permute(0, 3, 1, 2)

    def _bias(self, iy: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:
        """(heads, Hp, Wp, k, k) bias of every query's window."""
        k = self.kernel_size
        by = iy - torch.arange(iy.shape[0], device=iy.device)[:, None] + k - 1
        bx = ix - torch.arange(ix.shape[0], device=ix.device)[:, None] + k - 1
        return self.rpb[:, by[:, None, :, None], bx[None, :, None, :]]

    def _attend(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Reference path: gathers every query's k x k keys and values. (B, heads, Hp, Wp, d) in and out."""
        iy = _window_index(q.shape[2], self.kernel_size, q.device)
        ix = _window_index(q.shape[3], self.kernel_size, q.device)
        rows, cols = iy[:, None, :, None], ix[None, :, None, :]
        key_n = key[:, :, rows, cols]                 # (B, heads, Hp, Wp, k, k, d)
        value_n = value[:, :, rows, cols]
        scores = torch.einsum('bhijd,bhijuvd->bhijuv', q, key_n) + self._bias(iy, ix)
        attn = scores.flatten(-2).softmax(-1).view_as(scores)
        return torch.einsum('bhijuv,bhijuvd->bhijd', attn, value_n)

    def _attend_tiled(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Fast path: each tile of t x t queries attends to its (t+k-1)^2 key region with a bias of -inf
        outside the queries' own windows; same result as :meth:`_attend`. (B, heads, Hp, Wp, d) in and out."""
        batch, heads, hp, wp, dim = q.shape
        t = self.tile
        ky, by = _tiles(hp, self.kernel_size, t, q.device)
        kx, bx = _tiles(wp, self.kernel_size, t, q.device)
        (n_ty, ry), (n_tx, rx) = ky.shape, kx.shape
        (by, kind_y), (bx, kind_x) = _kinds(by), _kinds(bx)
        tiles = heads * n_ty * n_tx   # per image

        def regions(x: torch.Tensor) -> torch.Tensor:
            # Whole rows, then d-vectors, are copied by index_select; far cheaper than one 2-D gather.
            x = x.index_select(2, ky.flatten()).index_select(3, kx.flatten())
            return x.view(batch, heads, n_ty, ry, n_tx, rx, dim).transpose(3, 4).reshape(batch, tiles, ry * rx, dim)

        queries = F.pad(q, (0, 0, 0, n_tx * t - wp, 0, n_ty * t - hp))
        queries = queries.view(batch, heads, n_ty, t, n_tx, t, dim).transpose(3, 4).reshape(batch, tiles, t * t, dim)
        # The bias is gathered from the table once per pair of tile kinds, then copied tile by tile (an
        # element-wise gather of every tile's bias cost more than the attention). Index -1, outside a
        # query's window, reads the -inf appended to each axis of the table.
        rpb = F.pad(self.rpb, (0, 1, 0, 1), value=float('-inf'))
        bias = rpb[:, by[:, None, :, None, :, None], bx[None, :, None, :, None, :]]   # (heads, Uy, Ux, t, t, Ry, Rx)
        bias = bias.to(q.dtype).index_select(1, kind_y).index_select(2, kind_x)      # (heads, Ty, Tx, ...)
        bias = bias.reshape(tiles, t * t, ry * rx)                                   # shared by the batch
        if torch.is_grad_enabled() and (queries.requires_grad or bias.requires_grad):
            # Training: plain autograd, measured faster here than the fused kernel with a hand-written
            # backward (the windows are small and the block is recomputed under checkpointing anyway), and
            # than SDPA's math path, whose softmax adds three passes to find rows masked entirely (none are).
            scores = torch.matmul(queries, regions(key).transpose(-1, -2)).add_(bias)   # q is already scaled
            out = torch.matmul(scores.softmax(-1), regions(value))
        else:
            # A 4-D mask, as the fused kernel takes it.
            out = F.scaled_dot_product_attention(queries, regions(key), regions(value), attn_mask=bias[None],
                                                 scale=1.0)
        out = out.view(batch, heads, n_ty, n_tx, t, t, dim).transpose(3, 4)
        return out.reshape(batch, heads, n_ty * t, n_tx * t, dim)[:, :, :hp, :wp]
