from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...compat import is_compiling
from . import deformable_bias
from .attention_backward import DenseBias, attention_backward
from .norm import LayerNorm2d
from .plan import attention_budget_bytes, attention_plan, size_cached


def _grid(height: int, width: int, shift: float, by_last_index: bool, device: torch.device,
          dtype: torch.dtype) -> torch.Tensor:
    """(H, W, 2) points (y, x) at ((i + shift) / D) * 2 - 1 on each axis, D = n - 1 if ``by_last_index`` else n.

    Where D is 0 (a one-pixel axis, on which the authors' code divides by zero) the point sits at the centre.
    """
    axes = []
    for n in (height, width):
        denom = n - 1 if by_last_index else n
        index = torch.arange(n, device=device, dtype=dtype)
        axes.append((index + shift) * (2.0 / denom) - 1.0 if denom > 0 else torch.zeros_like(index))
    return torch.stack(torch.meshgrid(*axes, indexing='ij'), dim=-1)


def _query_grid(height: int, width: int, version: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H*W, 2) query positions, (y, x) in [-1, 1]: pixel centres in DAT, i / (n - 1) in DAT++."""
    return _grid(height, width, 0.5 if version == 1 else 0.0, version == 2, device, dtype).reshape(-1, 2)


def _query_points(height: int, width: int, version: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The query positions as the fast path's lookups take them: (x, y) order, halved."""
    return _query_grid(height, width, version, device, dtype).flip(-1) * 0.5


def _reference_points(height: int, width: int, version: int, device: torch.device, dtype: torch.dtype
                      ) -> torch.Tensor:
    """(Hk, Wk, 2) key reference points, (y, x) in [-1, 1]: pixel centres in DAT; DAT++ divides by n - 1
    instead of n, which shifts its grid by half a cell."""
    return _grid(height, width, 0.5, version == 2, device, dtype)


# Elements of one chunk's (batch * heads, queries, keys) bias in the cpu plan: 4 MB in fp32. Measured on
# CPU (2 cores) at 1344x800: 0.5 to 8 MB chunks run within 10% of each other, 64 MB ones 3x slower.
CHUNK_ELEMENTS = 1 << 20


def _coord_dtype(x: torch.Tensor) -> torch.dtype:
    # Coordinates stay in fp32 under half precision: in bf16 neighbouring query positions collapse
    # at detection resolution.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class DeformableAttention(nn.Module):
    """Deformable multi-head attention ('D' blocks of DAT and DAT++).

    Queries come from every pixel; keys and values from ``Hk x Wk`` points sampled from the input at
    learned offsets around a regular reference grid (stride ``stride``). A relative position bias is
    read from ``rpe_table`` by bilinear interpolation at the query-to-key displacement, so the table is
    independent of the input size.

    Args:
        channels: C, = num_heads * head_dim.
        num_heads: attention heads.
        groups: offset groups; group ``g`` owns channels ``[g*C/groups, (g+1)*C/groups)``.
        stride: stride of the reference grid (and of the offset conv).
        offset_kernel: kernel of the depth-wise offset conv.
        offset_range_factor: >= 0: offsets are ``tanh(.) * factor / Hk`` (DAT); < 0: unbounded offsets,
            positions clamped to [-1, 1] (DAT++).
        table_size: (h0, w0), feature size the bias table was built for; table is (heads, 2h0-1, 2w0-1).
        version: 1 for DAT (pixel-centre reference and query grids), 2 for DAT++ (its own grids, see
            ``_reference_points`` and ``_query_grid``).
        reference: use the plain path, which materialises the (queries, keys) displacement grid, bias,
            scores and softmax of every head at once; the default path does the same arithmetic in chunks of
            query rows and recomputes them in backward instead of storing them.
    """

    def __init__(self, channels: int, num_heads: int, groups: int, stride: int, offset_kernel: int,
                 offset_range_factor: float, table_size: Tuple[int, int], version: int,
                 reference: bool = False) -> None:
        super().__init__()
        self.reference = reference
        if channels % num_heads or num_heads % groups:
            raise ValueError(f'channels ({channels}) must divide into num_heads ({num_heads}), '
                             f'and num_heads into groups ({groups})')
        if version not in (1, 2):
            raise ValueError(f'version must be 1 (DAT) or 2 (DAT++), got {version}')
        self.num_heads = num_heads
        self.groups = groups
        self.scale = (channels // num_heads) ** -0.5
        self.offset_range_factor = offset_range_factor
        self.version = version
        group_channels = channels // groups
        self.conv_offset = nn.Sequential(
            nn.Conv2d(group_channels, group_channels, offset_kernel, stride,
                      0 if offset_kernel == stride else offset_kernel // 2, groups=group_channels),
            LayerNorm2d(group_channels),
            nn.GELU(),
            nn.Conv2d(group_channels, 2, 1, bias=False))
        self.proj_q = nn.Conv2d(channels, channels, 1)
        self.proj_k = nn.Conv2d(channels, channels, 1)
        self.proj_v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.rpe_table = nn.Parameter(torch.zeros(num_heads, 2 * table_size[0] - 1, 2 * table_size[1] - 1))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W). Returns the output (B, C, H, W), the sampling positions and their reference
        points, both (B, groups, Hk, Wk, 2) in (y, x) order, normalised to [-1, 1]."""
        batch, channels, height, width = x.shape
        groups = self.groups
        cdtype = _coord_dtype(x)

        q = self.proj_q(x)
        offset = self._offsets(q)
        hk, wk = offset.shape[2:]
        offset = offset.permute(0, 2, 3, 1).to(cdtype)            # (B*g, Hk, Wk, 2)
        ref = size_cached(_reference_points, hk, wk, self.version, x.device, cdtype)
        if self.offset_range_factor >= 0:
            # Scaled per axis with Python arithmetic on hk, wk (not a new tensor), so that an ONNX trace keeps
            # the scale a function of the input size instead of a constant.
            bound = offset.tanh()
            pos = ref + torch.stack([bound[..., 0] * (self.offset_range_factor / hk),
                                     bound[..., 1] * (self.offset_range_factor / wk)], dim=-1)
        else:
            pos = (ref + offset).clamp(-1.0, 1.0)

        # grid_sample's (x, y) order, for the keys and for the bias. Keys, and the attention's output up to
        # proj_out, are one row of points (1, Hk*Wk) and (1, H*W): compiled with symbolic sizes, a view of a map
        # with two symbolic sides that the backward keeps (proj_k's output gradient, proj_out's input) stops
        # inductor (torch 2.13) while it orders the view's strides. The 1x1 convolutions do not mind the shape.
        pos_xy = pos.flip(-1).reshape(batch * groups, 1, hk * wk, 2)
        sampled = F.grid_sample(x.reshape(batch * groups, channels // groups, height, width).to(cdtype),
                                pos_xy, mode='bilinear', align_corners=True).to(x.dtype)
        sampled = sampled.reshape(batch, channels, 1, hk * wk)
        attend = self._attend if self.reference else self._attend_chunked
        out = attend(q, self.proj_k(sampled), self.proj_v(sampled), pos_xy.reshape(batch * groups, hk * wk, 2))
        return (self.proj_out(out).reshape(batch, channels, height, width), pos.reshape(batch, groups, hk, wk, 2),
                ref.expand(batch, groups, hk, wk, 2))

    def _offsets(self, q: torch.Tensor) -> torch.Tensor:
        """(B*g, 2, Hk, Wk) offsets from each group's channels of q (B, C, H, W)."""
        conv = self.conv_offset[0]
        # The groups share the depth-wise conv: run it once over all C channels, its weights repeated, on q as
        # it is laid out (channels last). A group-major reshape of q first cost 30 of 32 ms at stage 1 of
        # DAT++ at 1344x800.
        hidden = F.conv2d(q, conv.weight.repeat(self.groups, 1, 1, 1), conv.bias.repeat(self.groups),
                          conv.stride, conv.padding, groups=q.shape[1])
        return self.conv_offset[1:](hidden.reshape(-1, conv.out_channels, *hidden.shape[2:]))

    def _bias(self, query: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(B*heads, M, Ns) bias of M query positions (M, 2) towards the keys at pos (B*g, Ns, 2), both (x, y)."""
        displacement = (query[None, :, None] - pos[:, None]) * 0.5                 # (B*g, M, Ns, 2)
        bias = F.grid_sample(_group_tables(self.rpe_table.to(pos.dtype), pos.shape[0], self.groups),
                             displacement, mode='bilinear', align_corners=True)
        return bias.reshape(-1, query.shape[0], pos.shape[1])

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Reference path. q: (B, C, H, W); k, v: (B, C, 1, Hk*Wk); pos: (B*g, Hk*Wk, 2), the keys' (x, y).

        Returns (B, C, 1, H*W).
        """
        batch, channels, height, width = q.shape
        q, k, v = (t.reshape(batch * self.num_heads, channels // self.num_heads, -1) for t in (q, k, v))
        scores = torch.einsum('bcm,bcn->bmn', q, k) * self.scale
        query = _query_grid(height, width, self.version, pos.device, pos.dtype).flip(-1)
        scores = scores + self._bias(query, pos).to(scores.dtype)
        return torch.einsum('bmn,bcn->bcm', scores.softmax(-1), v).reshape(batch, channels, 1, height * width)

    def _attend_chunked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Fast path, same arguments and result as :meth:`_attend`; see :class:`_ChunkedBiasedAttention`."""
        batch, channels, height, width = q.shape
        heads = self.num_heads
        # (x, y) order and the queries' share of the displacement's factor 1/2 come with the cached grid; the
        # keys' share each lookup takes where it reads them (no op of its own).
        query = size_cached(_query_points, height, width, self.version, pos.device, pos.dtype)

        def heads_first(t: torch.Tensor) -> torch.Tensor:
            """(B, C, h, w) -> (B, heads, h*w, d) in one copy, whose gradient comes back in t's own layout:
            channels last for q, as the block's maps are; NCHW for k and v, from grid_sample."""
            if t.stride(1) == 1:
                t = t.permute(0, 2, 3, 1).reshape(batch, -1, heads, channels // heads).transpose(1, 2)
            else:
                t = t.reshape(batch, heads, channels // heads, -1).transpose(2, 3)
            return t.contiguous()

        attend = _biased_attention_traced if torch.jit.is_tracing() else _ChunkedBiasedAttention.apply
        out = attend(heads_first(q), heads_first(k), heads_first(v), self.rpe_table, pos, query, self.groups,
                     self.scale, attention_plan(q.device))
        # Laid out channels last, as q and the block's other maps are: proj_out and the residual add then run
        # without a layout conversion, in either pass.
        return out.transpose(1, 2).reshape(batch, 1, height * width, channels).permute(0, 3, 1, 2)


def _group_tables(table: torch.Tensor, batch_groups: int, groups: int) -> torch.Tensor:
    """(B*g, heads/g, Th, Tw): the bias tables (heads, Th, Tw) of each offset group, for ``batch_groups``
    = B*g, as grid_sample takes them."""
    table = table.reshape(groups, -1, *table.shape[1:]).expand(batch_groups // groups, -1, -1, -1, -1)
    return table.reshape(batch_groups, -1, *table.shape[3:])


class _KernelLookup:
    """Bias-table reads of one layer call through the CPU kernels of deformable_bias.cpp, which compute
    each read point from its query and key and never materialise the (queries, keys, 2) grid.

    table: (heads, Th, Tw); keys: (B*g, Ns, 2) and query: (M, 2), (x, y), the query halved (see
    :class:`_ChunkedBiasedAttention`). ``bias(rows)``, for the forward's SDPA, is (B*g, heads/g, len(rows), Ns)
    in the coordinates' dtype; ``chunk(rows)`` is the bias of those queries for :func:`attention_backward`,
    which collects the gradients that ``gradients()`` returns, summed over all chunks.
    """

    def __init__(self, table: torch.Tensor, keys: torch.Tensor, query: torch.Tensor, groups: int):
        self.table_shape = table.shape
        th, tw = table.shape[1:]
        self.query = query.t().contiguous()           # (2, M)
        self.keys = keys.permute(2, 0, 1).mul(0.5).contiguous()   # (2, B*g, Ns), halved as the query is
        self.table = F.pad(table.to(keys.dtype), (1, 1, 1, 1)).view(groups, -1, th + 2, tw + 2)
        self.buffer = keys.new_empty(0)
        self.grad_table = self.grad_keys = 0

    def coords(self, rows: slice) -> tuple:
        """The kernels' first five arguments for these queries: padded table, query x, y, key x, y."""
        return self.table, self.query[0, rows], self.query[1, rows], self.keys[0], self.keys[1]

    def bias(self, rows: slice) -> torch.Tensor:
        # One buffer serves every chunk of the call: a fresh allocation per chunk costs its page faults.
        shape = (self.keys.shape[1], self.table.shape[1], rows.stop - rows.start, self.keys.shape[2])
        size = shape[0] * shape[1] * shape[2] * shape[3]
        if self.buffer.numel() < size:   # the first chunk, which is the largest
            self.buffer = self.keys.new_empty(size)
        out = self.buffer[:size].view(shape)
        torch.ops.dat_mm.deformable_bias_out(*self.coords(rows), out)
        return out

    def chunk(self, rows: slice) -> '_KernelChunk':
        return _KernelChunk(self, rows)

    @staticmethod
    def transient_bytes(heads: int, coord: int, query: int, backward: bool) -> int:
        """Bytes that a chunk holds at once per (image and group, query, key), for ``heads`` heads per group and
        coordinates and q of ``coord`` and ``query`` bytes per element. Forward: the bias, and its copy in q's
        dtype; backward: the scores becoming P in place, and dS."""
        if backward:
            return 2 * heads * coord
        return heads * coord + (heads * query if query != coord else 0)

    def gradients(self) -> Tuple[torch.Tensor, torch.Tensor]:
        th, tw = self.table_shape[1:]
        grad_table = self.grad_table[..., 1:-1, 1:-1].reshape(self.table_shape)
        # From the gradient of the cell index (grid + 1) / 2 * (n - 1), with grid = query - key / 2.
        return grad_table, self.grad_keys.transpose(1, 2) * self.keys.new_tensor([(1 - tw) / 4, (1 - th) / 4])


class _KernelChunk:
    """One chunk of queries for :func:`attention_backward`, through the kernels: one pass adds the bias to the
    scores, takes their softmax and forms dS, from which it takes the table and key gradients for the lookup."""

    def __init__(self, lookup: _KernelLookup, rows: slice) -> None:
        self.lookup, self.rows = lookup, rows

    def probs_and_grad_scores(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
                              delta: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
        probs = torch.bmm(q, k.transpose(1, 2))
        grad_s = torch.bmm(grad_out, v.transpose(1, 2))
        grad_table, grad_keys = torch.ops.dat_mm.deformable_biased_softmax_backward_(
            *self.lookup.coords(self.rows), scale, probs, delta, grad_s)
        self.lookup.grad_table = self.lookup.grad_table + grad_table
        self.lookup.grad_keys = self.lookup.grad_keys + grad_keys
        return probs, grad_s

    def take_gradient(self, grad_scores: torch.Tensor) -> None:
        """The kernel pass above took the table and key gradients already."""


class _GridSampleChunk(DenseBias):
    """One chunk of queries for :func:`attention_backward` through the grid_sample lookup: the scores are added
    into the chunk's own bias, and the table and key gradients are taken from dS once P is freed."""

    def __init__(self, lookup: '_GridSampleLookup', rows: slice) -> None:
        bias = lookup.bias(rows)
        super().__init__(bias.flatten(0, 1), owned=True)
        self.lookup, self.rows, self.shape = lookup, rows, bias.shape

    def take_gradient(self, grad_scores: torch.Tensor) -> None:
        self.lookup.add_gradient(self.rows, grad_scores.view(self.shape))


class _GridSampleLookup:
    """The same reads through grid_sample on each chunk's (B*g, M, Ns, 2) grid: the device plan's lookup
    (CUDA's grid_sample kernels are fast), and the cpu plan's where the kernels cannot be built."""

    def __init__(self, table: torch.Tensor, keys: torch.Tensor, query: torch.Tensor, groups: int):
        self.table_shape, self.keys, self.query = table.shape, keys, query
        self.tables = _group_tables(table.to(keys.dtype), keys.shape[0], groups)
        self.grad_tables = self.grad_grid = None

    def _grid(self, rows: slice) -> torch.Tensor:
        return torch.sub(self.query[None, rows, None], self.keys[:, None], alpha=0.5)

    def bias(self, rows: slice) -> torch.Tensor:
        return F.grid_sample(self.tables, self._grid(rows), mode='bilinear', align_corners=True)

    def add_gradient(self, rows: slice, grad: torch.Tensor) -> None:
        # Called directly: autograd through the grid would add a pass to negate and sum its gradient. The grid
        # is built again rather than kept from the bias: it is as large as the bias of one group's heads.
        check_nondeterminism_allowed(grad.device)
        d_tables, d_grid = torch.ops.aten.grid_sampler_2d_backward(grad, self.tables, self._grid(rows), 0, 0, True,
                                                                   [True, True])
        d_grid = d_grid.sum(1)
        if self.grad_tables is None:
            self.grad_tables, self.grad_grid = d_tables, d_grid
        else:
            self.grad_tables += d_tables
            self.grad_grid += d_grid

    def chunk(self, rows: slice) -> _GridSampleChunk:
        return _GridSampleChunk(self, rows)

    @staticmethod
    def transient_bytes(heads: int, coord: int, query: int, backward: bool) -> int:
        """As :meth:`_KernelLookup.transient_bytes`. Both passes build the (queries, keys, 2) grid beside the bias;
        the forward may copy the bias into q's dtype; the backward adds the scores into the bias, takes their
        softmax P (two maps at once), forms dP beside P, then, P freed, holds dS, the grid again and its gradient."""
        build = 2 * coord + heads * coord
        if backward:
            return max(build, 2 * heads * coord, heads * coord + 4 * coord)
        return max(build, heads * coord + (heads * query if query != coord else 0))

    def gradients(self) -> Tuple[torch.Tensor, torch.Tensor]:
        # The grid is query - key / 2.
        return self.grad_tables.view(-1, *self.table_shape).sum(0), self.grad_grid.mul(-0.5)


def check_nondeterminism_allowed(device: torch.device) -> None:
    """grid_sample's CUDA backward adds into the table's gradient with atomics, and torch has no deterministic
    version of it: under ``torch.use_deterministic_algorithms(True)`` torch would stop there with a message that
    does not say what to change. Stop first, and say it."""
    if (device.type == 'cuda' and torch.are_deterministic_algorithms_enabled()
            and not torch.is_deterministic_algorithms_warn_only_enabled()):
        raise RuntimeError(
            'dat_mm: deformable attention cannot train on CUDA under torch.use_deterministic_algorithms(True) (what '
            "MMEngine's randomness=dict(deterministic=True) sets): its position bias and its key sampling are read "
            "by grid_sample, whose CUDA backward torch implements with atomic adds only. Train with "
            'randomness=dict(deterministic=False), or allow the non-deterministic ops with a warning: '
            'torch.use_deterministic_algorithms(True, warn_only=True).')


def _lookup(table: torch.Tensor, keys: torch.Tensor, query: torch.Tensor, groups: int, plan: str):
    if plan == 'cpu' and keys.device.type == 'cpu' and deformable_bias.available():
        return _KernelLookup(table, keys, query, groups)
    return _GridSampleLookup(table, keys, query, groups)


def _chunks(q: torch.Tensor, k: torch.Tensor, lookup, groups: int, coord_dtype: torch.dtype, plan: str,
            backward: bool) -> List[slice]:
    """Slices of the M queries of q (B, heads, M, d) towards the Ns keys of k, each holding at most the attention
    budget in (queries, keys) transients (``lookup.transient_bytes``), in blocks of at most CHUNK_ELEMENTS bias
    elements in the cpu plan and as few blocks as the budget allows in the device plan."""
    batch, heads, queries, _ = q.shape
    per_query = batch * groups * k.shape[2] * lookup.transient_bytes(
        heads // groups, coord_dtype.itemsize, q.dtype.itemsize, backward)
    count = max(1, -(-per_query * queries // attention_budget_bytes()))
    # Compiled code chunks by the budget alone: a chunk count that follows the map size would fix the size.
    if plan == 'cpu' and not is_compiling():
        count = max(count, -(-queries // max(1, CHUNK_ELEMENTS // (batch * heads * k.shape[2]))))
    step = -(-queries // count)
    # The bounds are expressions of the query count and only the number of chunks is a Python int: a graph
    # compiled for dynamic shapes then guards on that number alone, and serves every size that has as many
    # chunks (one, at the sizes a device budget holds) instead of the one size it was traced at.
    return [slice(part * step, torch.sym_min(queries, (part + 1) * step)) for part in range(-(-queries // step))]


# Parts the queries of a traced deformable layer are cut into: a fixed number, so that the graph does not depend
# on the export size, and an inference engine that frees each part's (queries, keys) tensors before the next holds
# a quarter of them at a time.
TRACED_PARTS = 4


def _biased_attention_traced(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, keys: torch.Tensor,
                             query: torch.Tensor, groups: int, scale: float, plan: str) -> torch.Tensor:
    """:class:`_ChunkedBiasedAttention` in plain ops, for a trace (ONNX export): standard operators only, and no
    loop whose length the export size would fix. The queries attend in TRACED_PARTS parts; each part's bias is
    one GridSample on its (queries, keys, 2) grid, which is built by expanding the queries and subtracting the
    keys (a broadcast over the last axis alone, which inference engines run at memory speed)."""
    batch_groups, dim = keys.shape[0], q.shape[-1]
    q4, k4, v4 = (t.reshape(batch_groups, -1, t.shape[2], dim) for t in (q, k, v))
    tables = _group_tables(table.to(keys.dtype), batch_groups, groups)
    queries = q4.shape[2]
    step = (queries + TRACED_PARTS - 1) // TRACED_PARTS
    outs = []
    for part in range(TRACED_PARTS):
        rows = slice(part * step, (part + 1) * step)
        points = query[rows]
        grid = points[None, :, None].expand(batch_groups, -1, keys.shape[1], 2) - keys[:, None] * 0.5
        bias = F.grid_sample(tables, grid, mode='bilinear', align_corners=True)
        scores = torch.matmul(q4[:, :, rows], k4.transpose(-1, -2)).mul(scale).add(bias.to(q.dtype))
        outs.append(torch.matmul(scores.softmax(-1), v4))
    return torch.cat(outs, dim=2).view_as(q)


class _ChunkedBiasedAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v with the deformable position bias, a chunk of queries at a time.

    Forward: each chunk's bias is built (it takes no gradient) and handed to the fused SDPA kernel, which
    only takes its fast path for a mask that does not require grad (a mask that does sends every call to
    the math path, measured 3x slower on CPU, with a safe-softmax that adds four passes over the scores).
    Backward recomputes a chunk's bias, gets dq, dk, dv and the bias gradient from
    :func:`attention_backward`, and the table and key-position gradients from the lookup's backward. No
    (queries, keys) tensor outlives its chunk, in either pass. The plan sets the chunks (see :func:`_chunks`)
    and the lookup: the cpu plan's compiled kernels where they exist, else grid_sample.

    q: (B, heads, M, d); k, v: (B, heads, Ns, d); table: (heads, Th, Tw); keys: (B*g, Ns, 2); query: (M, 2);
    keys and queries in (x, y), the query halved, so that query - key / 2 is grid_sample's grid. Returns (B, heads, M, d).
    Heads are viewed as (offset group, head in group), so that the lookup's batch entries are SDPA's.
    """

    @staticmethod
    def forward(ctx, q, k, v, table, keys, query, groups, scale, plan):
        batch_groups, dim = keys.shape[0], q.shape[-1]
        q4, k4, v4 = (t.view(batch_groups, -1, t.shape[2], dim) for t in (q, k, v))
        lookup = _lookup(table, keys, query, groups, plan)
        chunks = _chunks(q, k, lookup, groups, keys.dtype, plan, backward=False)
        if len(chunks) == 1:
            out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=lookup.bias(chunks[0]).to(q.dtype),
                                                 scale=scale).view_as(q)
        else:
            out = torch.empty_like(q)
            out4 = out.view_as(q4)
            for rows in chunks:
                out4[:, :, rows] = F.scaled_dot_product_attention(
                    q4[:, :, rows], k4, v4, attn_mask=lookup.bias(rows).to(q.dtype), scale=scale)
        ctx.save_for_backward(q, k, v, table, keys, query, out)
        ctx.groups, ctx.scale, ctx.plan = groups, scale, plan
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, table, keys, query, out = ctx.saved_tensors
        batch_groups, dim = keys.shape[0], q.shape[-1]
        k3, v3 = k.flatten(0, 1), v.flatten(0, 1)
        # reshape: grad_out comes back through the channels-last output, a view that splits into the groups
        # only for one image.
        q4, out4, grad_out4 = (t.reshape(batch_groups, -1, t.shape[2], dim) for t in (q, out, grad_out))
        lookup = _lookup(table, keys, query, ctx.groups, ctx.plan)
        chunks = _chunks(q, k, lookup, ctx.groups, keys.dtype, ctx.plan, backward=True)
        grad_q = torch.empty_like(q) if len(chunks) > 1 else None
        grad_k = grad_v = None
        for rows in chunks:
            # In the working precision (fp32 under half precision): dK and dV sum over the chunks, rounded once.
            d_q, d_k, d_v, _ = attention_backward(
                q4[:, :, rows].flatten(0, 1), k3, v3, lookup.chunk(rows), out4[:, :, rows].flatten(0, 1),
                grad_out4[:, :, rows].flatten(0, 1), ctx.scale)
            if grad_q is None:   # a single chunk
                grad_q = d_q.to(q.dtype).view_as(q)
            else:
                grad_q.view_as(q4)[:, :, rows] = d_q.view_as(q4[:, :, rows])
            grad_k = d_k if grad_k is None else grad_k.add_(d_k)
            grad_v = d_v if grad_v is None else grad_v.add_(d_v)
        grad_table, grad_keys = lookup.gradients()
        return (grad_q, grad_k.to(k.dtype).view_as(k), grad_v.to(v.dtype).view_as(v), grad_table.to(table.dtype),
                grad_keys, None, None, None, None)
