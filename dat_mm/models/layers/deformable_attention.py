from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .norm import LayerNorm2d


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


# Elements of one chunk's (batch * heads, queries, keys) bias in the fast path: 4 MB in fp32. Measured on
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

    def _reference_points(self, hk: int, wk: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(Hk, Wk, 2) key reference points, (y, x) in [-1, 1]: pixel centres in DAT; DAT++ divides by
        n - 1 instead of n, which shifts its grid by half a cell."""
        return _grid(hk, wk, 0.5, self.version == 2, device, dtype)

    def _query_grid(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(H, W, 2) query positions, (y, x) in [-1, 1]: pixel centres in DAT, i / (n - 1) in DAT++."""
        return _grid(h, w, 0.5 if self.version == 1 else 0.0, self.version == 2, device, dtype)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W). Returns the output (B, C, H, W), the sampling positions and their reference
        points, both (B, groups, Hk, Wk, 2) in (y, x) order, normalised to [-1, 1]."""
        batch, channels, height, width = x.shape
        groups, heads = self.groups, self.num_heads
        cdtype = _coord_dtype(x)

        q = self.proj_q(x)
        offset = self.conv_offset(q.reshape(batch * groups, channels // groups, height, width))
        hk, wk = offset.shape[2:]
        offset = offset.permute(0, 2, 3, 1).to(cdtype)            # (B*g, Hk, Wk, 2)
        ref = self._reference_points(hk, wk, x.device, cdtype)
        if self.offset_range_factor >= 0:
            # Scaled per axis with Python arithmetic on hk, wk (not a new tensor), so that an ONNX trace keeps
            # the scale a function of the input size instead of a constant.
            bound = offset.tanh()
            pos = ref + torch.stack([bound[..., 0] * (self.offset_range_factor / hk),
                                     bound[..., 1] * (self.offset_range_factor / wk)], dim=-1)
        else:
            pos = (ref + offset).clamp(-1.0, 1.0)

        sampled = F.grid_sample(x.reshape(batch * groups, channels // groups, height, width).to(cdtype),
                                pos.flip(-1), mode='bilinear', align_corners=True).to(x.dtype)
        sampled = sampled.reshape(batch, channels, hk, wk)
        num_keys = hk * wk
        k = self.proj_k(sampled).reshape(batch * heads, -1, num_keys)
        v = self.proj_v(sampled).reshape(batch * heads, -1, num_keys)
        q = q.reshape(batch * heads, -1, height * width)

        attend = self._attend if self.reference else self._attend_chunked
        out = attend(q, k, v, pos.reshape(batch * groups, num_keys, 2), height, width)
        out = self.proj_out(out.reshape(batch, channels, height, width))
        return out, pos.reshape(batch, groups, hk, wk, 2), ref.expand(batch, groups, hk, wk, 2)

    def _bias(self, query: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(B*heads, M, Ns) bias of M query positions (M, 2) towards the keys at pos (B*g, Ns, 2)."""
        displacement = (query[None, :, None] - pos[:, None]) * 0.5                 # (B*g, M, Ns, 2)
        bias = F.grid_sample(_group_tables(self.rpe_table.to(pos.dtype), pos.shape[0], self.groups),
                             displacement.flip(-1), mode='bilinear', align_corners=True)
        return bias.reshape(-1, query.shape[0], pos.shape[1])

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                height: int, width: int) -> torch.Tensor:
        """Reference path. q: (B*heads, d, HW); k, v: (B*heads, d, Ns); pos: (B*g, Ns, 2).

        Returns (B*heads, d, HW).
        """
        scores = torch.einsum('bcm,bcn->bmn', q, k) * self.scale
        query = self._query_grid(height, width, pos.device, pos.dtype).reshape(-1, 2)
        scores = scores + self._bias(query, pos).to(scores.dtype)
        return torch.einsum('bmn,bcn->bcm', scores.softmax(-1), v)

    def _attend_chunked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                        height: int, width: int) -> torch.Tensor:
        """Fast path, same arguments and result as :meth:`_attend`; see :class:`_ChunkedBiasedAttention`."""
        batch_heads, dim, num_keys = k.shape
        batch, heads = batch_heads // self.num_heads, self.num_heads
        # (x, y) order and the factor 1/2 of the displacement are applied once here, on the small tensors.
        query = self._query_grid(height, width, pos.device, pos.dtype).reshape(-1, 2).flip(-1) * 0.5
        keys = pos.flip(-1) * 0.5

        def heads_first(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, heads, dim, -1).transpose(2, 3).contiguous()

        out = _ChunkedBiasedAttention.apply(heads_first(q), heads_first(k), heads_first(v),
                                            self.rpe_table, keys, query, self.groups, self.scale)
        return out.transpose(2, 3).reshape(batch_heads, dim, height * width)


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                       out: torch.Tensor, grad_out: torch.Tensor, scale: float
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``out = softmax(q k^T * scale + bias) v``, recomputing the probabilities P; the bias
    gradient is dS = P * (dO v^T - rowsum(dO * out)).

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


def _group_tables(table: torch.Tensor, batch_groups: int, groups: int) -> torch.Tensor:
    """(B*g, heads/g, Th, Tw): the bias tables (heads, Th, Tw) of each offset group, for ``batch_groups``
    = B*g, as grid_sample takes them."""
    table = table.reshape(groups, -1, *table.shape[1:]).expand(batch_groups // groups, -1, -1, -1, -1)
    return table.reshape(batch_groups, -1, *table.shape[3:])


class _ChunkedBiasedAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v with the deformable position bias, a chunk of queries at a time.

    Forward: each chunk's bias is built (it takes no gradient) and handed to the fused SDPA kernel, which
    only takes its fast path for a mask that does not require grad (a mask that does sends every call to
    the math path, measured 3x slower on CPU, with a safe-softmax that adds four passes over the scores).
    Backward recomputes a chunk's bias, gets dq, dk, dv and the bias gradient from
    :func:`attention_backward`, and the table and key-position gradients from grid_sample's backward
    kernel. No (queries, keys) tensor outlives its chunk, in either pass.

    grid_sample's CPU kernels share out work by batch entry, here one per offset group and image: with one
    group and one image (DAT++ stage 1 at batch 1) they ran on one core, 2.7x and 1.8x slower than split
    over two. So on CPU a chunk's queries are cut into ``parts`` batch entries, enough to occupy every thread.

    q: (B, heads, M, d); k, v: (B, heads, Ns, d); table: (heads, Th, Tw); keys: (B*g, Ns, 2); query: (M, 2);
    keys and queries in (x, y) and halved, so that query - key is grid_sample's grid. Returns (B, heads, M, d).
    """

    @staticmethod
    def _chunks(q: torch.Tensor, k: torch.Tensor, batch_groups: int):
        """(queries, parts): slices of the queries, each cut into ``parts`` equal spans."""
        batch, heads, queries, _ = q.shape
        want = 1 if q.is_cuda else max(1, -(-torch.get_num_threads() // batch_groups))
        step = max(want, CHUNK_ELEMENTS // (batch * heads * k.shape[2]) // want * want)
        for start in range(0, queries, step):
            stop = min(queries, start + step)
            parts = max(p for p in range(1, want + 1) if (stop - start) % p == 0)
            yield slice(start, stop), parts

    @staticmethod
    def _bias(tables: torch.Tensor, keys: torch.Tensor, query: torch.Tensor, parts: int):
        """The chunk's grid (B*g*parts, M/parts, Ns, 2), tables (B*g*parts, heads/g, Th, Tw) and bias
        (B*g*parts, heads/g, M/parts, Ns)."""
        grid = (query[None, :, None] - keys[:, None]).view(keys.shape[0] * parts, -1, keys.shape[1], 2)
        tables = tables[:, None].expand(-1, parts, -1, -1, -1).reshape(-1, *tables.shape[1:])
        return grid, tables, F.grid_sample(tables, grid, mode='bilinear', align_corners=True)

    @staticmethod
    def forward(ctx, q, k, v, table, keys, query, groups, scale):
        batch_groups, dim = keys.shape[0], q.shape[-1]
        out = torch.empty_like(q)
        # Heads as (offset group, head in group), so that a batch entry of grid_sample's is one of SDPA's.
        q4, k4, v4, out4 = (t.view(batch_groups, -1, t.shape[2], dim) for t in (q, k, v, out))
        tables = _group_tables(table.to(keys.dtype), batch_groups, groups)
        for queries, parts in _ChunkedBiasedAttention._chunks(q, k, batch_groups):
            _, _, bias = _ChunkedBiasedAttention._bias(tables, keys, query[queries], parts)
            bias = bias.view(batch_groups, parts, *bias.shape[1:]).to(q.dtype)
            span = bias.shape[3]
            for part in range(parts):
                rows = slice(queries.start + part * span, queries.start + (part + 1) * span)
                out4[:, :, rows] = F.scaled_dot_product_attention(q4[:, :, rows], k4, v4, attn_mask=bias[:, part],
                                                                  scale=scale)
        ctx.save_for_backward(q, k, v, table, keys, query, out)
        ctx.groups, ctx.scale = groups, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, table, keys, query, out = ctx.saved_tensors
        batch_groups, num_keys, dim = keys.shape[0], keys.shape[1], q.shape[-1]
        k3, v3 = k.flatten(0, 1), v.flatten(0, 1)
        grad_q = torch.empty_like(q)
        q4, out4, grad_out4, grad_q4 = (t.view(batch_groups, -1, t.shape[2], dim)
                                        for t in (q, out, grad_out, grad_q))
        grad_k, grad_v = torch.zeros_like(k3), torch.zeros_like(v3)
        tables = _group_tables(table.to(keys.dtype), batch_groups, ctx.groups)
        grad_tables, grad_keys = torch.zeros_like(tables), torch.zeros_like(keys)
        for queries, parts in _ChunkedBiasedAttention._chunks(q, k, batch_groups):
            grid, part_tables, bias = _ChunkedBiasedAttention._bias(tables, keys, query[queries], parts)
            bias = bias.view(batch_groups, parts, *bias.shape[1:])
            span = bias.shape[3]
            grad_bias = torch.empty_like(bias)
            for part in range(parts):
                rows = slice(queries.start + part * span, queries.start + (part + 1) * span)
                d_q, d_k, d_v, d_bias = attention_backward(
                    q4[:, :, rows].flatten(0, 1), k3, v3, bias[:, part].flatten(0, 1),
                    out4[:, :, rows].flatten(0, 1), grad_out4[:, :, rows].flatten(0, 1), ctx.scale)
                grad_q4[:, :, rows] = d_q.view_as(grad_q4[:, :, rows])
                grad_bias[:, part] = d_bias.view_as(grad_bias[:, part])
                grad_k += d_k
                grad_v += d_v
            # Called directly: autograd through the grid would add a pass to negate and sum its gradient.
            d_tables, d_grid = torch.ops.aten.grid_sampler_2d_backward(
                grad_bias.flatten(0, 1), part_tables, grid, 0, 0, True, [True, True])
            grad_tables += d_tables.view(batch_groups, parts, *tables.shape[1:]).sum(1)
            grad_keys -= d_grid.view(batch_groups, -1, num_keys, 2).sum(1)
        grad_table = grad_tables.view(-1, *table.shape).sum(0).to(table.dtype)
        return grad_q, grad_k.view_as(k), grad_v.view_as(v), grad_table, grad_keys, None, None, None
