// Fused CPU kernel for the softmax losses: cross-entropy over additively adjusted logits,
// CE(z + a, y), with its closed-form gradient and the per-class gradient statistics, in one
// pass over the logits (each row is read once and its gradient written once, while the row
// sits in L1).
//
// For a row n with target t = y_n (rows with y_n == ignore_index count nowhere):
//   m = max_j (z_j + a_j),  s = sum_j exp(z_j + a_j - m),  p_j = exp(z_j + a_j - m) / s
//   loss_n = log s + m - (z_t + a_t)              (exact where p_t underflows)
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
  *loss = std::log(s) + m - (z[t] + a[t]);
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

// logits [N, C] contiguous float32/float64; adjustment [C] of the same dtype, or undefined;
// targets [N] int64 in [0, C) or ignore_index. Returns (loss [N], grad [N, C], pos [C],
// neg [C], normaliser []): loss and grad are zero on ignored rows; pos and neg are empty
// unless want_stats; grad is empty unless want_grad; the normaliser is the number of valid
// rows, at least 1.
std::vector<torch::Tensor> adjusted_cross_entropy(const torch::Tensor& logits,
                                                  const c10::optional<torch::Tensor>& adjustment,
                                                  const torch::Tensor& targets,
                                                  int64_t ignore_index, bool mean,
                                                  bool want_stats, bool want_grad) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.is_contiguous(),
              "logits must be a contiguous CPU tensor [N, C]");
  TORCH_CHECK(targets.device().is_cpu() && targets.scalar_type() == at::kLong &&
                  targets.dim() == 1 && targets.size(0) == logits.size(0) &&
                  targets.is_contiguous(),
              "targets must be a contiguous CPU int64 tensor [N]");
  const int64_t N = logits.size(0), C = logits.size(1);
  TORCH_CHECK(C > 0, "logits must have at least one class column");
  torch::Tensor adj = adjustment.has_value() && adjustment->defined()
                          ? adjustment->contiguous()
                          : torch::zeros({C}, logits.options());
  TORCH_CHECK(adj.scalar_type() == logits.scalar_type() && adj.numel() == C,
              "the adjustment must be a [C] vector of the logits' dtype");

  const int64_t* y = targets.data_ptr<int64_t>();
  int64_t valid = 0;
  for (int64_t n = 0; n < N; ++n) {
    if (y[n] == ignore_index) continue;
    TORCH_CHECK(y[n] >= 0 && y[n] < C, "target ", y[n], " of row ", n,
                " is not a class in [0, ", C, ") nor ignore_index (", ignore_index, ")");
    ++valid;
  }
  const int64_t count = std::max<int64_t>(valid, 1);

  auto loss = torch::empty({N}, logits.options());
  auto grad = want_grad ? torch::empty_like(logits) : torch::Tensor();
  // chunks of rows, each with its own accumulators (at most one chunk per thread)
  const int64_t grain = 32;
  const int64_t chunks =
      std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + grain - 1) / grain));
  const int64_t per_chunk = (N + chunks - 1) / chunks;
  auto acc = want_stats ? torch::zeros({chunks, 2, C}, logits.options()) : torch::Tensor();
  // the gradient row of a call without a gradient: one scratch row per chunk
  auto scratch = want_grad ? torch::Tensor() : torch::empty({chunks, C}, logits.options());

  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "eqlosses_adjusted_cross_entropy", [&] {
    const scalar_t* z = logits.data_ptr<scalar_t>();
    const scalar_t* a = adj.data_ptr<scalar_t>();
    scalar_t* out = loss.data_ptr<scalar_t>();
    scalar_t* g = want_grad ? grad.data_ptr<scalar_t>() : nullptr;
    scalar_t* ac = want_stats ? acc.data_ptr<scalar_t>() : nullptr;
    scalar_t* sc = want_grad ? nullptr : scratch.data_ptr<scalar_t>();
    const scalar_t scale = mean ? scalar_t(1) / static_cast<scalar_t>(count) : scalar_t(1);
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t k = first; k < last; ++k) {
        scalar_t* pos = ac ? ac + k * 2 * C : nullptr;
        scalar_t* neg = ac ? pos + C : nullptr;
        const int64_t end = std::min(N, (k + 1) * per_chunk);
        for (int64_t n = k * per_chunk; n < end; ++n) {
          scalar_t* row = g ? g + n * C : sc + k * C;
          if (y[n] == ignore_index) {
            out[n] = 0;
            if (g) std::fill(row, row + C, scalar_t(0));
            continue;
          }
          one_row<scalar_t>(z + n * C, a, C, y[n], scale, row, out + n, pos, neg);
        }
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
