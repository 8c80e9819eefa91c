// CPU kernels for the deformable attention's relative position bias: bilinear reads of the bias table at
// every (query, key) displacement. They replace grid_sample on a materialised (queries, keys, 2) grid,
// whose writing and reading cost more than the lookup itself. The forward hands the bias to SDPA. The
// backward works a query at a time in one pass: it adds the bias to the recomputed scores, takes their
// softmax, forms the scores' gradient and takes the table and key gradients from it, reading the table
// once.
//
// Query m reads key n's bias at grid_sample's grid point (qx[m] - kx[n], qy[m] - ky[n]), in [-1, 1] over
// the table, with align_corners=True. The cell index is computed in grid_sample's own order of
// operations, so that both paths put a point on the same side of a cell border, where the gradient
// jumps. The table arrives padded with one cell of zeros on each side, so that grid_sample's zero padding
// needs no test per corner: a point with any corner outside the padded table lies wholly outside the
// table (all four corners zero) and is moved to the padding's top-left cell with zero fractions.
//
// Registered as operators of the dat_mm namespace (torch.ops.dat_mm.*), so that torch.compile traces each
// call as one node; their schemas and fake kernels are in deformable_bias.py, which builds this file with
// -march=native and -fno-trapping-math (which lets the float-to-int conversions vectorise).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

// For one query (qx, qy) and N keys: each read point's top-left corner as an offset into the padded
// (Th + 2, Tw + 2) table, and its fractions along x and y.
template <typename T>
inline void corners(const T* __restrict__ kx, const T* __restrict__ ky, T qx, T qy, int64_t th, int64_t tw,
                    int64_t n_keys, int32_t* __restrict__ offset, T* __restrict__ fx, T* __restrict__ fy) {
  const int32_t row = static_cast<int32_t>(tw + 2);
  const T width = static_cast<T>(tw), height = static_cast<T>(th);
  const T x_scale = static_cast<T>(tw - 1) / 2, y_scale = static_cast<T>(th - 1) / 2;
  for (int64_t n = 0; n < n_keys; ++n) {
    T x = ((qx - kx[n]) + T(1)) * x_scale, y = ((qy - ky[n]) + T(1)) * y_scale;
    const bool inside = (x > T(-1)) & (x < width) & (y > T(-1)) & (y < height);
    x = inside ? x : T(-1);
    y = inside ? y : T(-1);
    const T x0 = std::floor(x), y0 = std::floor(y);
    fx[n] = x - x0;
    fy[n] = y - y0;
    offset[n] = (static_cast<int32_t>(y0) + 1) * row + static_cast<int32_t>(x0) + 1;
  }
}

// One query's bias towards N keys in one table plane t. Kept a function of its own, with restrict
// pointers, so that the compiler vectorises the reads as gathers.
template <typename T>
inline void read(const T* __restrict__ t, const int32_t* __restrict__ offset, const T* __restrict__ fx,
                 const T* __restrict__ fy, int32_t row, int64_t n_keys, T* __restrict__ out) {
  for (int64_t n = 0; n < n_keys; ++n) {
    const int32_t i = offset[n];
    const T top = t[i] + fx[n] * (t[i + 1] - t[i]);
    const T bottom = t[i + row] + fx[n] * (t[i + row + 1] - t[i + row]);
    out[n] = top + fy[n] * (bottom - top);
  }
}

// One query's scores towards N keys, s = scale * s + bias, in place; keeps the bias's slopes along x and y at
// each read point in sx and sy for the gradient pass, so that the table is read once per element in backward.
template <typename T>
inline void add_bias_and_slopes(const T* __restrict__ t, const int32_t* __restrict__ offset,
                                const T* __restrict__ fx, const T* __restrict__ fy, int32_t row, int64_t n_keys,
                                T scale, T* __restrict__ s, T* __restrict__ sx, T* __restrict__ sy) {
  for (int64_t n = 0; n < n_keys; ++n) {
    const int32_t i = offset[n];
    const T dx_top = t[i + 1] - t[i], dx_bottom = t[i + row + 1] - t[i + row];
    const T upper = t[i] + fx[n] * dx_top;
    const T lower = t[i + row] + fx[n] * dx_bottom;
    s[n] = s[n] * scale + (upper + fy[n] * (lower - upper));
    sx[n] = dx_top + fy[n] * (dx_bottom - dx_top);
    sy[n] = lower - upper;
  }
}

// exp over the softmax's range (x <= 0), in a form the compiler vectorises (std::exp is not, short of
// -ffast-math): x = k ln 2 + r with |r| <= ln 2 / 2, e^r by a polynomial (the coefficients of Cephes'
// expf), 2^k put into the exponent bits. Its softmax matches torch's within the fp32 tests' 1e-5; double
// (the golden tests' precision) uses std::exp itself.
inline float softmax_exp(float x) {
  // Clamped where e^x nears float's smallest normal, so that 2^k stays a normal float; a weight below
  // 1.6e-38 next to the row's maximum of 1 is lost in the sum either way.
  x = std::max(x, -87.0f);
  const float k = std::floor(x * 1.44269504f + 0.5f);
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;   // ln 2 in two parts, for an exact k ln 2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(two_k));
  return e * two_k;
}

inline double softmax_exp(double x) { return std::exp(x); }

// Reductions of one row. The compiler vectorises a float reduction only where it may reorder it
// (-fassociative-math), which would also reorder the cell-index arithmetic above; so float rows are
// reduced in explicit 8-lane vectors, double rows (the tests' precision) in order.
template <typename T>
inline T row_max(const T* __restrict__ s, int64_t n_keys) {
  T top = std::numeric_limits<T>::lowest();
  for (int64_t n = 0; n < n_keys; ++n) {
    top = std::max(top, s[n]);
  }
  return top;
}

template <typename T>
inline T row_sum(const T* __restrict__ s, int64_t n_keys) {
  T sum = 0;
  for (int64_t n = 0; n < n_keys; ++n) {
    sum += s[n];
  }
  return sum;
}

typedef float Lanes __attribute__((vector_size(32)));
constexpr int64_t kLanes = sizeof(Lanes) / sizeof(float);

inline Lanes load_lanes(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <>
inline float row_max<float>(const float* __restrict__ s, int64_t n_keys) {
  float top = std::numeric_limits<float>::lowest();
  int64_t n = 0;
  if (n_keys >= kLanes) {
    Lanes lanes = load_lanes(s);
    for (n = kLanes; n + kLanes <= n_keys; n += kLanes) {
      const Lanes v = load_lanes(s + n);
      lanes = v > lanes ? v : lanes;
    }
    for (int64_t j = 0; j < kLanes; ++j) {
      top = std::max(top, lanes[j]);
    }
  }
  for (; n < n_keys; ++n) {
    top = std::max(top, s[n]);
  }
  return top;
}

template <>
inline float row_sum<float>(const float* __restrict__ s, int64_t n_keys) {
  Lanes lanes = {};
  int64_t n = 0;
  for (; n + kLanes <= n_keys; n += kLanes) {
    lanes += load_lanes(s + n);
  }
  float sum = 0;
  for (int64_t j = 0; j < kLanes; ++j) {
    sum += lanes[j];
  }
  for (; n < n_keys; ++n) {
    sum += s[n];
  }
  return sum;
}

// One query's dS = P * (dL/dP - delta), in place of dL/dP in g, and the position gradients it adds to gx and
// gy. A function of its own, with restrict pointers, so that the compiler vectorises it.
template <typename T>
inline void grad_and_slopes(const T* __restrict__ p, T delta, const T* __restrict__ sx, const T* __restrict__ sy,
                            int64_t n_keys, T* __restrict__ g, T* __restrict__ gx, T* __restrict__ gy) {
  for (int64_t n = 0; n < n_keys; ++n) {
    const T grad = p[n] * (g[n] - delta);
    g[n] = grad;
    gx[n] += grad * sx[n];
    gy[n] += grad * sy[n];
  }
}

// The softmax of one query's biased scores over the keys, in place.
template <typename T>
inline void softmax_row(int64_t n_keys, T* __restrict__ s) {
  const T top = row_max(s, n_keys);
  for (int64_t n = 0; n < n_keys; ++n) {
    s[n] = softmax_exp(s[n] - top);
  }
  const T inverse = T(1) / row_sum(s, n_keys);
  for (int64_t n = 0; n < n_keys; ++n) {
    s[n] *= inverse;
  }
}

// Scratch for one thread: corners() of one query.
template <typename T>
struct Corners {
  std::vector<int32_t> offset;
  std::vector<T> fx, fy, sx, sy;   // sx, sy: one head's slopes, for softmax_backward_kernel
  explicit Corners(int64_t n_keys) : offset(n_keys), fx(n_keys), fy(n_keys), sx(n_keys), sy(n_keys) {}
};

// Heads per offset group that the backward takes: the released models have 1 to 4.
constexpr int64_t kMaxHeads = 64;

struct Shape {
  int64_t batch_groups, groups, heads, th, tw, queries, keys;
  int64_t row() const { return tw + 2; }
  int64_t plane() const { return (th + 2) * (tw + 2); }
};

Shape shape_of(const at::Tensor& table, const at::Tensor& qx, const at::Tensor& qy,
               const at::Tensor& kx, const at::Tensor& ky) {
  TORCH_CHECK(table.dim() == 4 && qx.dim() == 1 && kx.dim() == 2, "deformable bias: bad ranks");
  for (const auto* t : {&table, &qx, &qy, &kx, &ky}) {
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == table.scalar_type(),
                "deformable bias: expects contiguous CPU tensors of one dtype");
  }
  TORCH_CHECK(qx.sizes() == qy.sizes() && kx.sizes() == ky.sizes(), "deformable bias: coordinate shapes differ");
  TORCH_CHECK(kx.size(0) % table.size(0) == 0, "deformable bias: batch * groups is not a multiple of groups");
  return {kx.size(0), table.size(0), table.size(1), table.size(2) - 2, table.size(3) - 2, qx.size(0), kx.size(1)};
}

void check_scores(const at::Tensor& t, const at::Tensor& table, const Shape& s) {
  TORCH_CHECK(t.is_contiguous() && t.scalar_type() == table.scalar_type() &&
                  t.sizes() == at::IntArrayRef({s.batch_groups * s.heads, s.queries, s.keys}),
              "deformable bias: scores or their gradient of the wrong shape or dtype");
}

// Calls body(bg, m, c) for every (image and group bg, query m), with the thread's scratch c holding corners()
// of its N keys, in parallel over the queries.
template <typename T, typename Body>
void for_each_query(const T* qx, const T* qy, const T* kx, const T* ky, const Shape& s, const Body& body) {
  at::parallel_for(0, s.batch_groups * s.queries, 1, [&](int64_t begin, int64_t end) {
    Corners<T> c(s.keys);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t bg = r / s.queries, m = r % s.queries;
      corners<T>(kx + bg * s.keys, ky + bg * s.keys, qx[m], qy[m], s.th, s.tw, s.keys, c.offset.data(),
                 c.fx.data(), c.fy.data());
      body(bg, m, c);
    }
  });
}

template <typename T>
void bias_kernel(const T* table, const T* qx, const T* qy, const T* kx, const T* ky, T* out, const Shape& s) {
  const int32_t row = static_cast<int32_t>(s.row());
  for_each_query<T>(qx, qy, kx, ky, s, [&](int64_t bg, int64_t m, Corners<T>& c) {
    for (int64_t h = 0; h < s.heads; ++h) {
      read<T>(table + ((bg % s.groups) * s.heads + h) * s.plane(), c.offset.data(), c.fx.data(), c.fy.data(), row,
              s.keys, out + ((bg * s.heads + h) * s.queries + m) * s.keys);
    }
  });
}

// Adds one query's dS (g[h], one row per head) into the table gradient at the four corners of each key's
// read point. The gradient is laid out heads last, (Th + 2, Tw + 2, heads): a scatter does not vectorise over
// the keys (two of them may share a cell), but the heads of one corner are adjacent: one vector add for two
// heads (measured 15-20% off the backward kernel's time on this project's CPU).
template <typename T, int H>
inline void scatter_heads(const T* const* g, const int32_t* __restrict__ offset, const T* __restrict__ fx,
                          const T* __restrict__ fy, int32_t row, int64_t n_keys, T* __restrict__ gt) {
  typedef T Heads __attribute__((vector_size(H * sizeof(T))));
  const auto add = [gt](int64_t cell, Heads v) {
    Heads sum;
    std::memcpy(&sum, gt + cell * H, sizeof(sum));
    sum += v;
    std::memcpy(gt + cell * H, &sum, sizeof(sum));
  };
  for (int64_t n = 0; n < n_keys; ++n) {
    Heads grad;
    for (int h = 0; h < H; ++h) {
      grad[h] = g[h][n];
    }
    const int32_t i = offset[n];
    const Heads bottom = grad * fy[n], top = grad - bottom;
    const Heads top_right = top * fx[n], bottom_right = bottom * fx[n];
    add(i, top - top_right);
    add(i + 1, top_right);
    add(i + row, bottom - bottom_right);
    add(i + row + 1, bottom_right);
  }
}

// The same for any number of heads, one at a time.
template <typename T>
inline void scatter_heads(const T* const* g, const int32_t* __restrict__ offset, const T* __restrict__ fx,
                          const T* __restrict__ fy, int32_t row, int64_t n_keys, T* __restrict__ gt,
                          int64_t heads) {
  for (int64_t n = 0; n < n_keys; ++n) {
    const int64_t i = offset[n];
    for (int64_t h = 0; h < heads; ++h) {
      const T bottom = g[h][n] * fy[n], top = g[h][n] - bottom;
      const T top_right = top * fx[n], bottom_right = bottom * fx[n];
      gt[i * heads + h] += top - top_right;
      gt[(i + 1) * heads + h] += top_right;
      gt[(i + row) * heads + h] += bottom - bottom_right;
      gt[(i + row + 1) * heads + h] += bottom_right;
    }
  }
}

// scores hold q k^T on entry and leave with the probabilities P = softmax(scale * scores + bias); grad holds
// dL/dP on entry and leaves with the scores' gradient dS = P * (dL/dP - delta), which is also the bias's:
// its table and key gradients are added into per-thread copies, summed by the caller.
template <typename T>
void softmax_backward_kernel(const T* table, const T* qx, const T* qy, const T* kx, const T* ky, T scale,
                             T* scores, const T* delta, T* grad, T* grad_table, T* grad_keys, int64_t threads,
                             const Shape& s) {
  const int32_t row = static_cast<int32_t>(s.row());
  for_each_query<T>(qx, qy, kx, ky, s, [&](int64_t bg, int64_t m, Corners<T>& c) {
    const int64_t thread = at::get_thread_num();
    TORCH_CHECK(thread < threads, "deformable bias: more worker threads than at::get_num_threads()");
    const int32_t* __restrict__ offset = c.offset.data();
    const T* __restrict__ fx = c.fx.data();
    const T* __restrict__ fy = c.fy.data();
    T* __restrict__ sx = c.sx.data();
    T* __restrict__ sy = c.sy.data();
    T* __restrict__ gx = grad_keys + (thread * s.batch_groups + bg) * 2 * s.keys;
    T* __restrict__ gy = gx + s.keys;
    const T* g[kMaxHeads];
    for (int64_t h = 0; h < s.heads; ++h) {
      const int64_t plane = (bg % s.groups) * s.heads + h, query = (bg * s.heads + h) * s.queries + m;
      T* __restrict__ p = scores + query * s.keys;
      T* __restrict__ gh = grad + query * s.keys;
      add_bias_and_slopes<T>(table + plane * s.plane(), offset, fx, fy, row, s.keys, scale, p, sx, sy);
      softmax_row<T>(s.keys, p);
      grad_and_slopes<T>(p, delta[query], sx, sy, s.keys, gh, gx, gy);
      g[h] = gh;
    }
    T* gt = grad_table + (thread * s.groups + bg % s.groups) * s.plane() * s.heads;
    if (s.heads == 2) {
      scatter_heads<T, 2>(g, offset, fx, fy, row, s.keys, gt);
    } else {
      scatter_heads<T>(g, offset, fx, fy, row, s.keys, gt, s.heads);
    }
  });
}

}  // namespace

// table: (groups, heads per group, Th + 2, Tw + 2), zero-padded; qx, qy: (M,); kx, ky: (B * groups, N).
// Writes the bias (B * groups, heads per group, M, N) into ``out``: the caller hands every chunk of a layer
// a view of one buffer, instead of a fresh allocation (and its page faults) per chunk.
void bias_out(const at::Tensor& table, const at::Tensor& qx, const at::Tensor& qy, const at::Tensor& kx,
              const at::Tensor& ky, const at::Tensor& out) {
  const Shape s = shape_of(table, qx, qy, kx, ky);
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == table.scalar_type() &&
                  out.sizes() == at::IntArrayRef({s.batch_groups, s.heads, s.queries, s.keys}),
              "deformable bias: out of the wrong shape or dtype");
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "deformable_bias", [&] {
    bias_kernel<scalar_t>(table.data_ptr<scalar_t>(), qx.data_ptr<scalar_t>(), qy.data_ptr<scalar_t>(),
                          kx.data_ptr<scalar_t>(), ky.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), s);
  });
}

// The backward of one chunk's attention probabilities in one pass: scores, q k^T of the chunk's queries
// (B * groups * heads per group, M, N), are replaced in place by the probabilities softmax(scale * scores +
// bias); grad, dL/dP, by the scores' (and bias's) gradient; delta: rowsum(dO * O), (B * groups * heads per
// group, M). Returns the padded table's gradient and the gradient (B * groups, 2, N) of the keys' cell index,
// x then y: the keys' own is -(Tw - 1) / 2 and -(Th - 1) / 2 times it.
std::tuple<at::Tensor, at::Tensor> biased_softmax_backward_(const at::Tensor& table, const at::Tensor& qx,
                                                            const at::Tensor& qy, const at::Tensor& kx,
                                                            const at::Tensor& ky, double scale,
                                                            const at::Tensor& scores, const at::Tensor& delta,
                                                            const at::Tensor& grad) {
  const Shape s = shape_of(table, qx, qy, kx, ky);
  check_scores(scores, table, s);
  check_scores(grad, table, s);
  TORCH_CHECK(delta.is_contiguous() && delta.scalar_type() == table.scalar_type() &&
                  delta.numel() == s.batch_groups * s.heads * s.queries,
              "deformable bias: delta of the wrong shape or dtype");
  TORCH_CHECK(s.heads <= kMaxHeads, "deformable bias: more than ", kMaxHeads, " heads per offset group");
  const int64_t threads = at::get_num_threads();
  auto grad_table = at::zeros({threads, s.groups, s.th + 2, s.tw + 2, s.heads}, table.options());
  auto grad_keys = at::zeros({threads, s.batch_groups, 2, s.keys}, table.options());
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "deformable_biased_softmax_backward", [&] {
    softmax_backward_kernel<scalar_t>(
        table.data_ptr<scalar_t>(), qx.data_ptr<scalar_t>(), qy.data_ptr<scalar_t>(), kx.data_ptr<scalar_t>(),
        ky.data_ptr<scalar_t>(), static_cast<scalar_t>(scale), scores.data_ptr<scalar_t>(),
        delta.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), grad_table.data_ptr<scalar_t>(),
        grad_keys.data_ptr<scalar_t>(), threads, s);
  });
  return {grad_table.sum(0).permute({0, 3, 1, 2}).contiguous(), grad_keys.sum(0)};
}

// The schemas mark what each operator writes (a!), so that torch.compile's functionalisation keeps the
// writes in order.
TORCH_LIBRARY(dat_mm, m) {
  m.def("deformable_bias_out(Tensor table, Tensor qx, Tensor qy, Tensor kx, Tensor ky, Tensor(a!) out) -> ()");
  m.def("deformable_biased_softmax_backward_(Tensor table, Tensor qx, Tensor qy, Tensor kx, Tensor ky, "
        "float scale, Tensor(a!) scores, Tensor delta, Tensor(b!) grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dat_mm, CPU, m) {
  m.impl("deformable_bias_out", &bias_out);
  m.impl("deformable_biased_softmax_backward_", &biased_softmax_backward_);
}
