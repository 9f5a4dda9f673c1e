// Fused CPU kernel for the softmax losses: cross-entropy over additively adjusted logits,
// CE(z + a, y), with its closed-form gradient and the per-class gradient statistics, in one
// pass over the logits (each row, or block of pixels, is read once and its gradient written
// once, while it sits in L1). Rows [N, C] or pixels [N, C, P].
//
// For a row n with target t = y_n (rows with y_n == ignore_index count nowhere):
//   m = max_j (z_j + a_j),  s = sum_j exp(z_j + a_j - m),  p_j = exp(z_j + a_j - m) / s
//   loss_n = log s + (m - (z_t + a_t))            (exact where p_t underflows)
//   grad_nj = scale * (p_j - [j == t])             (scale = 1 / #valid rows for a mean, else 1)
//   pos_t += 1 - p_t,   neg_j += p_j (j != t)      (the statistics of the Softmax-EQL family)
// The per-class sums are accumulated per chunk of rows and added in chunk order, so a result
// depends on the number of threads (as torch's own reductions do) but not on scheduling.
//
// Built on demand by eqlosses.functional.fused (torch.utils.cpp_extension); see that module.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace {

using at::vec::Vectorized;

template <typename T>
void one_row(const T* z, const T* a, int64_t C, int64_t t, T scale, T* g, T* loss, T* pos,
             T* neg) {
  using V = Vectorized<T>;
  const int64_t W = V::size();
  const int64_t body = C - C % W;
  // 1. m = max_j (z_j + a_j); NaN propagates (as in torch.softmax)
  T m = -std::numeric_limits<T>::infinity();
  if (body) {
    V vmax(-std::numeric_limits<T>::infinity());
    for (int64_t j = 0; j < body; j += W)
      vmax = at::vec::maximum(vmax, V::loadu(z + j) + V::loadu(a + j));
    m = at::vec::vec_reduce_all<T>([](V& x, V& y) { return at::vec::maximum(x, y); }, vmax);
  }
  for (int64_t j = body; j < C; ++j) {
    const T v = z[j] + a[j];
    m = (v > m || std::isnan(v)) ? v : m;
  }
  // 2. e_j = exp(z_j + a_j - m) into the gradient row, s = sum_j e_j
  T s = 0;
  if (body) {
    const V vm(m);
    V vs(0);
    for (int64_t j = 0; j < body; j += W) {
      const V e = (V::loadu(z + j) + V::loadu(a + j) - vm).exp();
      e.store(g + j);
      vs = vs + e;
    }
    s = at::vec::vec_reduce_all<T>([](V& x, V& y) { return x + y; }, vs);
  }
  for (int64_t j = body; j < C; ++j) {
    const T e = std::exp(z[j] + a[j] - m);
    g[j] = e;
    s += e;
  }
  // (m - z~_t first: it is exact when t is the argmax, and log s small beside m)
  *loss = std::log(s) + (m - (z[t] + a[t]));
  // 3. p = e / s: the negatives' sums (the target entry zeroed first, as no cancellation is
  //    wanted there), then the scaled gradient
  const T inv = T(1) / s;
  const T p_t = g[t] * inv;
  g[t] = 0;
  const T g_scale = scale * inv;
  if (neg != nullptr) {
    const V vinv(inv), vg(g_scale);
    for (int64_t j = 0; j < body; j += W) {
      const V e = V::loadu(g + j);
      (V::loadu(neg + j) + e * vinv).store(neg + j);
      (e * vg).store(g + j);
    }
    for (int64_t j = body; j < C; ++j) {
      neg[j] += g[j] * inv;
      g[j] *= g_scale;
    }
    pos[t] += T(1) - p_t;
  } else {
    const V vg(g_scale);
    for (int64_t j = 0; j < body; j += W) (V::loadu(g + j) * vg).store(g + j);
    for (int64_t j = body; j < C; ++j) g[j] *= g_scale;
  }
  g[t] = scale * (p_t - T(1));
}

// The same for a block of up to W = V::size() pixels of one image of logits [C, P] (NCHW with
// H*W = P): the pixels are the vector lanes and the channels the loop, so every load is
// contiguous. Lanes at or past `cnt` and ignored pixels are masked: their logits count as 0
// (non-finite values there reach nothing) and their probabilities as 0. `g` holds the block's
// gradient with channel stride `gP` starting at pixel `goff` (the gradient tensor, or a
// scratch block); `negv` accumulates [C][W] lane-wise sums of the negatives' probabilities.
template <typename T>
void pixel_block(const T* z, const T* a, int64_t C, int64_t P, int64_t p0, int64_t cnt,
                 const int64_t* y, int64_t ignore_index, T scale, T* g, int64_t gP,
                 int64_t goff, T* loss, T* pos, T* negv) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  T keep[W], s[W], m[W], inv[W], p_t[W];
  for (int64_t l = 0; l < W; ++l) keep[l] = (l < cnt && y[l] != ignore_index) ? T(1) : T(0);
  const V mask = V::loadu(keep) == V(T(1));
  const V zero(0);
  auto adjusted = [&](int64_t c) {
    return V::blendv(zero, V::loadu(z + c * P + p0, cnt) + V(a[c]), mask);
  };
  V vm(-std::numeric_limits<T>::infinity());
  for (int64_t c = 0; c < C; ++c) vm = at::vec::maximum(vm, adjusted(c));
  V vs(0);
  for (int64_t c = 0; c < C; ++c) {
    const V e = (adjusted(c) - vm).exp();
    e.store(g + c * gP + goff, cnt);
    vs = vs + e;
  }
  vs.store(s);
  vm.store(m);
  for (int64_t l = 0; l < W; ++l) {
    inv[l] = 0;
    if (keep[l] == T(0)) {
      if (l < cnt) loss[l] = 0;
      continue;
    }
    const int64_t t = y[l];
    inv[l] = T(1) / s[l];
    T& gt = g[t * gP + goff + l];
    p_t[l] = gt * inv[l];
    gt = 0;  // the target's entry leaves the negatives' sums
    loss[l] = std::log(s[l]) + (m[l] - (z[t * P + p0 + l] + a[t]));
  }
  const V vinv = V::loadu(inv), vg = vinv * V(scale);
  for (int64_t c = 0; c < C; ++c) {
    T* gc = g + c * gP + goff;
    const V e = V::loadu(gc, cnt);
    if (negv != nullptr) (V::loadu(negv + c * W) + e * vinv).store(negv + c * W);
    (e * vg).store(gc, cnt);
  }
  for (int64_t l = 0; l < cnt; ++l) {
    if (keep[l] == T(0)) continue;
    const int64_t t = y[l];
    g[t * gP + goff + l] = scale * (p_t[l] - T(1));
    if (pos != nullptr) pos[t] += T(1) - p_t[l];
  }
}

// logits [N, C] or [N, C, P] (pixels) contiguous float32/float64; adjustment [C] of the same
// dtype, or undefined; targets [N] or [N, P] int64 in [0, C) or ignore_index. Returns (loss
// of the targets' shape, grad of the logits' shape, pos [C], neg [C], normaliser []): loss and
// grad are zero on ignored rows (pixels); pos and neg are undefined unless want_stats; grad
// is undefined unless want_grad; the normaliser is the number of valid rows, at least 1.
std::vector<torch::Tensor> adjusted_cross_entropy(const torch::Tensor& logits,
                                                  const c10::optional<torch::Tensor>& adjustment,
                                                  const torch::Tensor& targets,
                                                  int64_t ignore_index, bool mean,
                                                  bool want_stats, bool want_grad) {
  TORCH_CHECK(logits.device().is_cpu() && (logits.dim() == 2 || logits.dim() == 3) &&
                  logits.is_contiguous(),
              "logits must be a contiguous CPU tensor [N, C] or [N, C, P]");
  const int64_t N = logits.size(0), C = logits.size(1);
  const int64_t P = logits.dim() == 3 ? logits.size(2) : 1;
  TORCH_CHECK(targets.device().is_cpu() && targets.scalar_type() == at::kLong &&
                  targets.is_contiguous() && targets.dim() == logits.dim() - 1 &&
                  targets.numel() == N * P && (N == 0 || targets.size(0) == N),
              "targets must be a contiguous CPU int64 tensor [N] or [N, P]");
  TORCH_CHECK(C > 0, "logits must have at least one class channel");
  torch::Tensor adj = adjustment.has_value() && adjustment->defined()
                          ? adjustment->contiguous()
                          : torch::zeros({C}, logits.options());
  TORCH_CHECK(adj.scalar_type() == logits.scalar_type() && adj.numel() == C,
              "the adjustment must be a [C] vector of the logits' dtype");

  const int64_t* y = targets.data_ptr<int64_t>();
  int64_t valid = 0;
  for (int64_t i = 0; i < N * P; ++i) {
    if (y[i] == ignore_index) continue;
    TORCH_CHECK(y[i] >= 0 && y[i] < C, "target ", y[i], " of row ", i / P,
                P > 1 ? " (pixel " + std::to_string(i % P) + ")" : std::string(),
                " is not a class in [0, ", C, ") nor ignore_index (", ignore_index, ")");
    ++valid;
  }
  const int64_t count = std::max<int64_t>(valid, 1);

  auto loss = torch::empty(targets.sizes(), logits.options());
  auto grad = want_grad ? torch::empty_like(logits) : torch::Tensor();
  const int64_t threads = at::get_num_threads();
  torch::Tensor acc;  // [chunks, 2, C]: each chunk's pos and neg sums

  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "eqlosses_adjusted_cross_entropy", [&] {
    using V = Vectorized<scalar_t>;
    constexpr int64_t W = V::size();
    const scalar_t* z = logits.data_ptr<scalar_t>();
    const scalar_t* a = adj.data_ptr<scalar_t>();
    scalar_t* out = loss.data_ptr<scalar_t>();
    scalar_t* g = want_grad ? grad.data_ptr<scalar_t>() : nullptr;
    const scalar_t scale = mean ? scalar_t(1) / static_cast<scalar_t>(count) : scalar_t(1);
    // work items: rows, or blocks of W pixels of one image; chunks of items, each with its
    // own accumulators (at most one chunk per thread)
    const int64_t blocks = P == 1 ? 1 : (P + W - 1) / W;
    const int64_t items = N * blocks;
    const int64_t grain = P == 1 ? 32 : 16;
    const int64_t chunks =
        std::max<int64_t>(1, std::min<int64_t>(threads, (items + grain - 1) / grain));
    const int64_t per_chunk = (items + chunks - 1) / chunks;
    acc = torch::zeros({want_stats ? chunks : 0, 2, C}, logits.options());
    scalar_t* ac = want_stats ? acc.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      // a chunk's scratch: the gradient of a call without one (a row, or a [C, W] block),
      // and the lane-wise negatives' sums of the pixel path
      std::vector<scalar_t> scratch(g ? 0 : (P == 1 ? C : C * W));
      std::vector<scalar_t> negv(ac && P > 1 ? C * W : 0);
      for (int64_t k = first; k < last; ++k) {
        scalar_t* pos = ac ? ac + k * 2 * C : nullptr;
        scalar_t* neg = ac ? pos + C : nullptr;
        std::fill(negv.begin(), negv.end(), scalar_t(0));
        const int64_t end = std::min(items, (k + 1) * per_chunk);
        for (int64_t i = k * per_chunk; i < end; ++i) {
          if (P == 1) {
            scalar_t* row = g ? g + i * C : scratch.data();
            if (y[i] == ignore_index) {
              out[i] = 0;
              if (g) std::fill(row, row + C, scalar_t(0));
              continue;
            }
            one_row<scalar_t>(z + i * C, a, C, y[i], scale, row, out + i, pos, neg);
            continue;
          }
          const int64_t n = i / blocks, p0 = (i % blocks) * W;
          const int64_t cnt = std::min(W, P - p0);
          pixel_block<scalar_t>(z + n * C * P, a, C, P, p0, cnt, y + n * P + p0, ignore_index,
                                scale, g ? g + n * C * P : scratch.data(), g ? P : W,
                                g ? p0 : 0, out + n * P + p0, pos,
                                negv.empty() ? nullptr : negv.data());
        }
        for (int64_t c = 0; c < static_cast<int64_t>(negv.size()) / W; ++c)
          for (int64_t l = 0; l < W; ++l) neg[c] += negv[c * W + l];
      }
    });
  });
  torch::Tensor pos, neg;
  if (want_stats) {
    auto sums = acc.sum(0);
    pos = sums[0];
    neg = sums[1];
  }
  auto normaliser = torch::full({}, static_cast<double>(count), logits.options());
  return {loss, grad, pos, neg, normaliser};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("adjusted_cross_entropy", &adjusted_cross_entropy,
        "CE(z + a, y) with its closed-form gradient and per-class statistics (CPU)");
}
