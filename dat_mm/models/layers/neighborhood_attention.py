import torch
import torch.nn.functional as F
from torch import nn

from ...compat import is_compiling, statically_known_true
from .attention_backward import attention_backward
from .plan import attention_plan, ceil_div, size_cached


def _unsettled(condition, negation) -> bool:
    """True where torch.compile cannot tell, without adding a guard, whether a condition on sizes holds: on
    symbolic sizes. The negation comes separately, as ``not`` on a symbolic bool would add a guard."""
    return not (statically_known_true(condition) or statically_known_true(negation))


def _tile_count(length, tile: int):
    """Tiles of ``tile`` queries along an axis of ``length``: ceil(length / tile); but length // tile + 1 where
    torch.compile traces a symbolic length of which it does not know whether ``tile`` divides it. With whole
    tiles only, the tiled map equals the map at lengths that divide, and the crop back to the map is a no-op there
    and not elsewhere: a graph on symbolic sizes would guard on the case it traced, and every 6th length would
    compile again. The spare tile's queries repeat the last row and are cropped."""
    if is_compiling() and _unsettled(length // tile * tile == length, length // tile * tile != length):
        return length // tile + 1
    return ceil_div(length, tile)


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
    n_tiles = _tile_count(length, tile)
    # Under an ONNX trace the length is a 0-d tensor: Python's min would freeze the export size's branch.
    # Compiled on a symbolic length, the region is always t + k - 1 keys, and on a map narrower than that it
    # starts before the map: those keys read position 0 and are masked, being outside every window. A region
    # that follows the map would be Min(...) in the gathers' sizes, whose index arithmetic inductor (torch 2.13)
    # fails to simplify ("vr must not be None"), or a branch on the size, a guard that compiles narrow maps again.
    full = tile + kernel_size - 1
    if isinstance(length, torch.Tensor):
        region = length.clamp(max=full)
    elif is_compiling() and _unsettled(length >= full, length < full):
        region = full
    else:
        region = full if length >= full else length
    starts = torch.arange(n_tiles, device=device) * tile
    queries = starts[:, None] + torch.arange(tile, device=device)
    keys = (starts - kernel_size // 2).clamp(min=0).clamp(max=length - region)[:, None] + \
        torch.arange(region, device=device)
    window = (queries - kernel_size // 2).clamp(min=0).clamp(max=length - kernel_size)[:, :, None]
    key = keys[:, None, :]
    inside = (key >= window) & (key < window + kernel_size)
    return keys.clamp(min=0), torch.where(inside, key - queries[:, :, None] + kernel_size - 1, -1)


def _tile_kinds(n_tiles, kernel_size: int, tile: int, device: torch.device):
    """Each tile's kind of bias pattern along one axis, from the sizes alone (nothing read back, traceable).

    A tile whose key region and queries' windows all lie inside the map has the interior pattern; only the
    first and the last ceil(k / t) + 1 tiles can differ, and each of those is given a kind of its own. The number
    of kinds is therefore fixed by k and t, whatever the map size (kinds may repeat a pattern; that costs a few
    small entries, not a result). Returns (each tile's kind (T,), a tile of each kind (K,)).
    """
    edge = -(-kernel_size // tile) + 1
    index = torch.arange(n_tiles, device=device)
    from_end = n_tiles - 1 - index
    kind = torch.where(index < edge, index, torch.where(from_end < edge, edge + from_end, 2 * edge))
    kinds = torch.arange(2 * edge + 1, device=device)
    example = torch.where(kinds < edge, kinds, torch.where(kinds < 2 * edge, n_tiles - 1 - (kinds - edge), edge))
    return kind, example.clamp(max=n_tiles - 1).clamp(min=0)


def _tiling(height: int, width: int, kernel_size: int, tile: int, device: torch.device) -> dict:
    """The tiles of a (height, width) map, from its size alone (shape arithmetic, nothing read back):

    - ``queries`` (Ty, Tx*t*t) and ``keys`` (Ty, Tx*R): the map positions of each tile row's queries and key
      regions, tile by tile;
    - ``by`` (Ty, t, Ry) and ``bx`` (Tx, t, Rx): each tile's bias index along one axis;
    - ``kind_y`` (Ty,) and ``kind_x`` (Tx,): each tile's kind along one axis, ``kind`` (Ty*Tx,) its kind of both;
      ``by_kind`` (Ky, t, Ry) and ``bx_kind`` (Kx, t, Rx): the bias index of each kind along one axis;
    - ``kind_cells`` (Ky*Kx*t*t*R,): each kind's bias elements as cells of the flattened, -inf-padded table.
    """
    ky, by = _tiles(height, kernel_size, tile, device)
    kx, bx = _tiles(width, kernel_size, tile, device)
    n_ty, n_tx = ky.shape[0], kx.shape[0]
    kind_y, example_y = _tile_kinds(n_ty, kernel_size, tile, device)
    kind_x, example_x = _tile_kinds(n_tx, kernel_size, tile, device)
    by_kind, bx_kind = by[example_y], bx[example_x]
    side = 2 * kernel_size   # of the padded table; index -1 is its last row / column, which holds -inf
    cells = (by_kind % side)[:, None, :, None, :, None] * side + (bx_kind % side)[None, :, None, :, None, :]
    # The last tile's queries past the map repeat its last row or column; their outputs are cropped.
    rows = torch.arange(n_ty * tile, device=device).clamp(max=height - 1).view(n_ty, tile)
    cols = torch.arange(n_tx * tile, device=device).clamp(max=width - 1).view(n_tx, tile)
    return dict(queries=(rows[:, None, :, None] * width + cols[None, :, None, :]).view(n_ty, -1),
                keys=(ky[:, None, :, None] * width + kx[None, :, None, :]).view(n_ty, -1), by=by, bx=bx,
                kind_y=kind_y, kind_x=kind_x, kind=(kind_y[:, None] * example_x.shape[0] + kind_x).view(-1),
                by_kind=by_kind, bx_kind=bx_kind, kind_cells=cells.reshape(-1))


def _row_tiling(height: int, width: int, kernel_size: int, tile: int, device: torch.device) -> dict:
    """:func:`_tiling` for the cpu plan's loop over tile rows, with each row's kind as a Python list (read once
    per size, on the CPU)."""
    tiles = _tiling(height, width, kernel_size, tile, device)
    return dict(tiles, kind_rows=tiles['kind_y'].tolist())


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
        # tiles of t x t queries to the (t + k - 1)^2 keys around them. At k = 7, t = k - 1 (4 copies, 144
        # scores per query) measured 5-15% faster than t = k (3.4 copies, 169 scores) and t = k - 2 (4.8, 121).
        self.reference = reference
        self.tile = max(1, kernel_size - 1)
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
        pad_h, pad_w = _shortfall(height, k), _shortfall(width, k)
        if isinstance(pad_h, torch.Tensor) or pad_h or pad_w:   # a copy of the map, where none is needed
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        hp, wp = x.shape[1:3]
        if self.reference:
            qkv = self.qkv(x)                         # (B, Hp, Wp, 3C)
            q, key, value = qkv.reshape(batch, hp, wp, 3, self.num_heads, -1).permute(3, 0, 4, 1, 2, 5)
            out = self._attend(q * self.scale, key, value).permute(0, 2, 3, 1, 4).reshape(batch, hp, wp, channels)
        else:
            # The projection writes the pixels as one axis, which the gathers index. Compiled with symbolic sizes,
            # a gather from an (Hp, Wp) layout splits each gathered position into a row and a column, and inductor
            # (torch 2.13) fails to simplify that index ("vr must not be None").
            out = self._attend_tiled(self.qkv(x.reshape(batch, hp * wp, channels)), hp, wp)
        return self.proj(out)[:, :height, :width].permute(0, 3, 1, 2)

    def _bias(self, iy: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:
        """(heads, Hp, Wp, k, k) bias of every query's window."""
        k = self.kernel_size
        by = iy - torch.arange(iy.shape[0], device=iy.device)[:, None] + k - 1
        bx = ix - torch.arange(ix.shape[0], device=ix.device)[:, None] + k - 1
        return self.rpb[:, by[:, None, :, None], bx[None, :, None, :]]

    def _attend(self, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Reference path: gathers every query's k x k keys and values. (B, heads, Hp, Wp, d) in and out, q scaled."""
        iy = _window_index(q.shape[2], self.kernel_size, q.device)
        ix = _window_index(q.shape[3], self.kernel_size, q.device)
        rows, cols = iy[:, None, :, None], ix[None, :, None, :]
        key_n = key[:, :, rows, cols]                 # (B, heads, Hp, Wp, k, k, d)
        value_n = value[:, :, rows, cols]
        scores = torch.einsum('bhijd,bhijuvd->bhijuv', q, key_n) + self._bias(iy, ix)
        attn = scores.flatten(-2).softmax(-1).view_as(scores)
        return torch.einsum('bhijuv,bhijuvd->bhijd', attn, value_n)

    def _attend_tiled(self, qkv: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
        """Fast path: each tile of t x t queries attends to its (t+k-1)^2 key region with a bias of -inf
        outside the queries' own windows; same result as :meth:`_attend`. qkv: (B, Hp*Wp, 3C), q unscaled.
        Returns (B, Hp', Wp', C), Hp' >= Hp and Wp' >= Wp in whole tiles (:func:`_tile_count`). The cpu plan
        attends a row of tiles at a time (:class:`_TiledAttention`), the device plan every tile at once
        (:class:`_TiledAttentionAtOnce`).
        """
        batch = qkv.shape[0]
        heads, t = self.num_heads, self.tile
        # A trace (ONNX export) and a compiled graph take the device plan's, whose ops do not depend on the map size.
        if attention_plan(qkv.device) == 'cpu' and not (torch.jit.is_tracing() or is_compiling()):
            tiles = size_cached(_row_tiling, hp, wp, self.kernel_size, t, qkv.device)
            n_ty, n_tx = tiles['by'].shape[0], tiles['bx'].shape[0]
            # Per kind of tile row: (Ky, Tx, heads, t*t, R).
            bias = self._tile_bias(tiles['by_kind'], tiles['bx_kind']).permute(1, 2, 0, 3, 4).index_select(
                1, tiles['kind_x'])
            out = _TiledAttention.apply(qkv.reshape(batch, hp * wp, 3, heads, -1), bias, tiles['queries'],
                                        tiles['keys'], tiles['kind_rows'], t, self.scale)
            return out.view(batch, n_ty * t, n_tx * t, -1)
        tiles = size_cached(_tiling, hp, wp, self.kernel_size, t, qkv.device)
        n_ty, n_tx = tiles['by'].shape[0], tiles['bx'].shape[0]
        # Heads first, so that the tiles of all heads gather as (B, heads * tiles) batch entries whose masks the
        # images share without a copy per image.
        qkv = qkv.reshape(batch, hp * wp, 3, heads, -1).permute(2, 0, 3, 1, 4).contiguous()   # (3, B, heads, HW, d)
        index = [tiles[key] for key in ('by', 'bx', 'kind', 'kind_cells')] + [tiles['queries'].view(-1),
                                                                              tiles['keys'].view(-1)]
        attend = _attend_tiles_traced if torch.jit.is_tracing() else _TiledAttentionAtOnce.apply
        out = attend(qkv, self._padded_table(), *index, self.scale)   # (B, heads*Ty*Tx, t*t, d)
        out = out.view(batch, heads, n_ty, n_tx, t, t, -1).permute(0, 2, 4, 3, 5, 1, 6)
        return out.reshape(batch, n_ty * t, n_tx * t, -1)

    def _padded_table(self) -> torch.Tensor:
        """(heads, 2k, 2k): the bias table with a row and a column of -inf appended, which index -1 reads (a key
        outside the query's window)."""
        return F.pad(self.rpb, (0, 1, 0, 1), value=float('-inf'))

    def _tile_bias(self, by: torch.Tensor, bx: torch.Tensor) -> torch.Tensor:
        """(heads, Ny, Nx, t*t, R): the bias of tiles with the bias indexes by (Ny, t, Ry) and bx (Nx, t, Rx).
        In the table's dtype: under autocast its gradient sums many tiles, which bf16 would round."""
        return _tile_bias(self._padded_table(), by, bx)


def _tile_bias(table: torch.Tensor, by: torch.Tensor, bx: torch.Tensor) -> torch.Tensor:
    """(heads, Ny, Nx, t*t, R) from the padded table (heads, 2k, 2k) and bias indexes by (Ny, t, Ry), bx (Nx, t, Rx)."""
    bias = table[:, by[:, None, :, None, :, None], bx[None, :, None, :, None, :]]   # (heads, Ny, Nx, t, t, Ry, Rx)
    return bias.reshape(*bias.shape[:3], by.shape[1] ** 2, -1)


def _gather_tiles(pixels: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, t: int):
    """Tiles of queries and key regions gathered as whole pixels (all heads' channels of a pixel in one
    contiguous copy: 6x faster on CPU than gathering each head's d channels).

    pixels: (..., Hp*Wp, 3, heads, d); queries (n*t*t,) and keys (n*R,): map positions, tile by tile. Returns
    q (..., n, heads, t*t, d) and k, v (..., n, heads, R, d), views of one gather each.
    """
    *lead, _, _, heads, dim = pixels.shape
    axis = len(lead)
    q = pixels.select(-3, 0).index_select(axis, queries).view(*lead, -1, t * t, heads, dim).transpose(-3, -2)
    kv = pixels.narrow(-3, 1, 2).index_select(axis, keys).view(*lead, q.shape[-4], -1, 2, heads, dim)
    return q, kv.select(-3, 0).transpose(-3, -2), kv.select(-3, 1).transpose(-3, -2)


class _TiledAttention(torch.autograd.Function):
    """Neighborhood attention of tiles of queries to their key regions, a row of tiles at a time in both passes.

    The forward gathers a row's queries and regions as whole pixels (all heads' channels, one contiguous copy
    each: 6x faster than gathering each head's d channels) and runs the fused kernel on them; its operands
    stay a few MB where whole-map ones were hundreds (much of their cost the first touch of fresh memory).
    The backward gathers them again, gets dq, dk, dv and the bias gradient from :func:`attention_backward`,
    and adds them into place. Nothing but the input and the output is kept.

    qkv: (B, Hp*Wp, 3, heads, d); bias: (Ky, Tx, heads, t*t, R), per kind of tile row; query_index (Ty, Tx*t*t)
    and key_index (Ty, Tx*R): the map positions of each tile row's queries and regions, tile by tile; kinds:
    each row's kind. Returns (B, Ty, t, Tx, t, heads, d).
    """

    @staticmethod
    def forward(ctx, qkv, bias, query_index, key_index, kinds, t, scale):
        batch, _, _, heads, dim = qkv.shape
        n_ty, n_tx = query_index.shape[0], bias.shape[1]
        out = qkv.new_empty(batch, n_ty, t, n_tx, t, heads, dim)
        # Views of a tensor that requires grad do too, even under no_grad, and send the kernel to its math path.
        masks = bias.detach().to(qkv.dtype)
        for image, pixels in enumerate(qkv):
            for row, kind in enumerate(kinds):
                q, k, v = _gather_tiles(pixels, query_index[row], key_index[row], t)
                attn = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[kind], scale=scale)
                out[image, row] = attn.transpose(1, 2).view(n_tx, t, t, heads, dim).transpose(0, 1)
        ctx.save_for_backward(qkv, bias, query_index, key_index, out)
        ctx.kinds, ctx.t, ctx.scale = kinds, t, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        qkv, bias, query_index, key_index, out = ctx.saved_tensors
        t = ctx.t
        heads, dim = qkv.shape[3:]
        n_tx = bias.shape[1]
        # Half precision is differentiated and accumulated in fp32, as in the fused kernels.
        work = torch.float32 if qkv.dtype in (torch.float16, torch.bfloat16) else qkv.dtype
        # Summed into contiguous (q, k, v) maps: index_add_ into qkv's strided thirds measured 7x slower.
        grad_qkv = qkv.new_zeros(3, *qkv.shape[:2], heads, dim, dtype=work)
        grad_bias = torch.zeros_like(bias, dtype=work)

        def by_head(x: torch.Tensor) -> torch.Tensor:   # (Tx, heads, n, d) -> (Tx*heads, n, d)
            return x.reshape(-1, *x.shape[2:]).to(work)

        def by_pixel(x: torch.Tensor) -> torch.Tensor:   # (Tx*heads, n, d) -> (Tx*n, heads, d)
            return x.view(n_tx, heads, -1, dim).transpose(1, 2).reshape(-1, heads, dim)

        for image, pixels in enumerate(qkv):
            for row, kind in enumerate(ctx.kinds):
                q, k, v = _gather_tiles(pixels, query_index[row], key_index[row], t)
                # (t, Tx, t, heads, d) -> (Tx, heads, t*t, d), as q
                o, grad_o = (x[image, row].permute(1, 3, 0, 2, 4).reshape(n_tx, heads, t * t, dim)
                             for x in (out, grad_out))
                grad_q, grad_k, grad_v, grad_s = attention_backward(
                    by_head(q), by_head(k), by_head(v), by_head(bias[kind]), by_head(o), by_head(grad_o), ctx.scale)
                grad_bias[kind].add_(grad_s.view_as(bias[kind]))   # `+=` would copy the sum onto itself
                grad_qkv[0, image].index_add_(0, query_index[row], by_pixel(grad_q))
                grad_qkv[1, image].index_add_(0, key_index[row], by_pixel(grad_k))
                grad_qkv[2, image].index_add_(0, key_index[row], by_pixel(grad_v))
        return (grad_qkv.permute(1, 2, 0, 3, 4).to(qkv.dtype), grad_bias.to(bias.dtype),
                None, None, None, None, None)


def _gather_heads(qkv: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor, tiles: int):
    """The tiles of queries, q (B, heads*T, t*t, d), and their key regions, k and v (B, heads*T, R, d), from
    qkv (3, B, heads, Hp*Wp, d): one gather of the query pixels and one of the regions (keys and values
    together), views of them. queries (T*t*t,) and keys (T*R,): map positions, tile by tile."""
    _, batch, heads, _, dim = qkv.shape
    q = qkv[0].index_select(2, queries).view(batch, heads * tiles, -1, dim)
    k, v = qkv[1:].index_select(3, keys).view(2, batch, heads * tiles, -1, dim)
    return q, k, v


def _attend_tiles_traced(qkv: torch.Tensor, table: torch.Tensor, by: torch.Tensor, bx: torch.Tensor, kind: torch.Tensor,
                         kind_cells: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """:class:`_TiledAttentionAtOnce`'s forward in plain ops, for a trace: an ONNX graph of standard operators
    (gathers, two batched matmuls and a softmax) with nothing of a custom Function in it."""
    q, k, v = _gather_heads(qkv, queries, keys, kind.shape[0])
    scores = torch.matmul(q, k.transpose(-1, -2)).mul(scale).add(_tile_bias(table, by, bx).flatten(0, 2))
    return torch.matmul(scores.softmax(-1), v)


class _TiledAttentionAtOnce(torch.autograd.Function):
    """The device plan's neighborhood attention: every tile of every image in one fused-kernel call; the
    backward gathers the tiles again and differentiates them all in one :func:`attention_backward`. A few dozen
    ops per layer whatever the map size, and no value read back.

    The tiles' bias is read from the table once per call, as a mask that the images share (heads and tiles are
    the batch entries of each image); its gradient is summed over the images and then over the tiles of each
    kind (:func:`_tile_kinds`), so that what reaches the table comes from a few dozen kinds of tile, not from
    every tile of every image.

    qkv: (3, B, heads, Hp*Wp, d); table: (heads, 2k, 2k), padded with -inf; by (Ty, t, Ry), bx (Tx, t, Rx),
    kind (T,), kind_cells (K*t*t*R,), queries (T*t*t,), keys (T*R,): see :func:`_tiling`. Returns
    (B, heads*T, t*t, d).
    """

    @staticmethod
    def forward(ctx, qkv, table, by, bx, kind, kind_cells, queries, keys, scale):
        q, k, v = _gather_heads(qkv, queries, keys, kind.shape[0])
        # Views of a tensor that requires grad do too, even under no_grad, and send the kernel to its math path.
        mask = _tile_bias(table.detach(), by, bx).flatten(0, 2).to(qkv.dtype)[None]   # (1, heads*T, t*t, R)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        ctx.save_for_backward(qkv, table, by, bx, kind, kind_cells, queries, keys, out)
        ctx.scale = scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        qkv, table, by, bx, kind, kind_cells, queries, keys, out = ctx.saved_tensors
        _, batch, heads, _, dim = qkv.shape
        tiles = kind.shape[0]
        # Half precision is differentiated and accumulated in fp32, as in the fused kernels.
        work = torch.float32 if qkv.dtype in (torch.float16, torch.bfloat16) else qkv.dtype
        q, k, v = (x.flatten(0, 1) for x in _gather_heads(qkv, queries, keys, tiles))
        mask = _tile_bias(table, by, bx).flatten(0, 2).to(work)   # shared by the images: broadcast, not copied
        grad_q, grad_k, grad_v, grad_s = attention_backward(q, k, v, mask, out.flatten(0, 1), grad_out.flatten(0, 1),
                                                            ctx.scale)
        # Summed over the images, then over the tiles of each kind, then into the table's cells.
        per_tile = grad_s.view(batch, heads, tiles, -1).sum(0)
        per_kind = per_tile.new_zeros(heads, kind_cells.shape[0] // per_tile.shape[2], per_tile.shape[2])
        per_kind.index_add_(1, kind, per_tile)
        grad_table = per_kind.new_zeros(heads, table[0].numel()).index_add_(1, kind_cells, per_kind.flatten(1))
        # Summed into the (q, k, v) maps, in qkv's heads-first layout.
        grad_qkv = qkv.new_zeros(qkv.shape, dtype=work)
        for part, index, grad in ((0, queries, grad_q), (1, keys, grad_k), (2, keys, grad_v)):
            grad_qkv[part].index_add_(2, index, grad.view(batch, heads, -1, dim))
        return (grad_qkv.to(qkv.dtype), grad_table.view_as(table).to(table.dtype),
                None, None, None, None, None, None, None)
