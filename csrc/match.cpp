// vtome::match: bipartite soft matching of every group (reference.match, ALGORITHM.md 1).
//
// metric [G, N, d] (any float dtype, any strides) -> out_idx [G, N - r], src_idx [G, r],
// dst_pos [G, r] (int64), src_score [G, r] (float32). Normalisation, scores, tie rule,
// ranking and output layout are bit-for-bit those of the reference.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "match.h"

namespace vtome {
namespace {

constexpr float kNormEps = 1e-12f;  // reference.NORM_EPS, as float32

// Sums of squares of kTok tokens at once (reference.normalize: float32, in order
// k = 0..d-1, a separate multiply and add): one independent chain per token, so the adds'
// latency overlaps instead of serialising.
constexpr int kTok = 8;

template <typename T>
void sum_squares(const T* m, int64_t s1, int64_t s2, int64_t d, int64_t count, float* sq) {
  if (count == kTok) {  // a full block: no per-element test, the chains unrolled
    float acc[kTok] = {};
    for (int64_t k = 0; k < d; ++k)
      for (int t = 0; t < kTok; ++t) {
        const float v = static_cast<float>(m[t * s1 + k * s2]);
        const float p = v * v;
        acc[t] = acc[t] + p;
      }
    for (int t = 0; t < kTok; ++t) sq[t] = acc[t];
    return;
  }
  for (int64_t t = 0; t < count; ++t) {
    float acc = 0.f;
    for (int64_t k = 0; k < d; ++k) {
      const float v = static_cast<float>(m[t * s1 + k * s2]);
      const float p = v * v;
      acc = acc + p;
    }
    sq[t] = acc;
  }
}

// row[k] = src[k] / norm (true division) into a contiguous row. Returns "has a NaN".
template <typename T>
bool divide_token(const T* src, int64_t sk, int64_t d, float norm, float* row) {
  if (sk == 1) {  // the common case, vectorised
    for (int64_t k = 0; k < d; ++k) row[k] = static_cast<float>(src[k]) / norm;
  } else {
    for (int64_t k = 0; k < d; ++k) row[k] = static_cast<float>(src[k * sk]) / norm;
  }
  uint32_t nan = 0;  // branch-free bit test, so the loop vectorises: |bits| > inf's bits
  for (int64_t k = 0; k < d; ++k) {
    uint32_t u;
    std::memcpy(&u, row + k, 4);
    nan |= (0x7f800000u - (u & 0x7fffffffu)) >> 31;
  }
  return nan != 0;
}

// Ranking order: larger row max first (NaN largest, as torch.sort), equal values by index.
struct Before {
  const float* key;
  bool operator()(int64_t i, int64_t j) const {
    const float a = key[i], b = key[j];
    const bool na = std::isnan(a), nb = std::isnan(b);
    if (na || nb) return na && (!nb || i < j);
    return a > b || (a == b && i < j);
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------
// Stage 1, normalise and pack (reference.normalize): every token divided by its norm in
// float32; A rows contiguous, B packed in column panels for the score kernel; padding
// columns and a masked distillation column hold NaN (they never win).
// ---------------------------------------------------------------------------------------
Halves normalise_pack(const at::Tensor& metric, bool distill_token, int64_t tc) {
  Halves h;
  h.g = metric.size(0), h.n = metric.size(1), h.d = metric.size(2);
  h.na = (h.n + 1) / 2, h.nb = h.n / 2;
  h.tc = tc;
  h.nbp = (h.nb + tc - 1) / tc * tc;
  const int64_t g = h.g, n = h.n, d = h.d, na = h.na, nb = h.nb, nbp = h.nbp;
  h.a.resize(size_t(g * na * d));
  h.bt.resize(size_t(g * d * nbp));
  h.nan_tok.resize(size_t(g * n));
  float* a = h.a.data();
  float* bt = h.bt.data();
  uint8_t* nan_tok = h.nan_tok.data();
  const int64_t s0 = metric.stride(0), s1 = metric.stride(1), s2 = metric.stride(2);
  // The norms are correctly rounded square roots (std::sqrt), as in the reference; torch's
  // own float32 CPU sqrt is not (measured: 1 ulp off for ~20% of random inputs with the
  // AVX2 kernels), and a norm one ulp off changes the scores.
  at::Tensor sq = at::empty({g, n}, metric.options().dtype(at::kFloat));
  float* sqp = sq.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, metric.scalar_type(), "vtome_norm", [&] {
    const scalar_t* m = metric.data_ptr<scalar_t>();
    at::parallel_for(0, (g * n + kTok - 1) / kTok, 32, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {  // kTok tokens of one group at a time
        int64_t t = c * kTok;
        const int64_t end = std::min(t + kTok, g * n);
        while (t < end) {
          const int64_t gi = t / n, i = t % n, cnt = std::min(end - t, n - i);
          sum_squares(m + gi * s0 + i * s1, s1, s2, d, cnt, sqp + t);
          t += cnt;
        }
      }
    });
    // IEEE (correctly rounded) square roots, as reference.normalize takes them.
    for (int64_t t = 0; t < g * n; ++t) sqp[t] = std::sqrt(sqp[t]);
    const float* norm = sqp;
    at::parallel_for(0, g * n, 256, [&](int64_t t0, int64_t t1) {
      std::vector<float> row(d);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t gi = t / n, i = t % n;
        float nv = norm[t];
        nv = nv < kNormEps ? kNormEps : nv;  // clamp_min; NaN compares false and stays NaN
        const scalar_t* src = m + gi * s0 + i * s1;
        if (i % 2 == 0) {  // A: a contiguous row
          nan_tok[t] = divide_token(src, s2, d, nv, a + (gi * na + i / 2) * d);
        } else {  // B: a column of its panel
          nan_tok[t] = divide_token(src, s2, d, nv, row.data());
          float* dst = bt + gi * d * nbp + scores::bt_index(i / 2, 0, d, tc);
          for (int64_t k = 0; k < d; ++k) dst[k * tc] = row[k];
        }
      }
    });
  });
  const float qnan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t gi = 0; gi < g; ++gi) {
    float* b = bt + gi * d * nbp;
    if (nb < nbp) {  // the padding columns, all in the last panel
      float* last = b + scores::bt_index(nbp - tc, 0, d, tc);
      for (int64_t k = 0; k < d; ++k)
        for (int64_t j = nb % tc; j < tc; ++j) last[k * tc + j] = qnan;
    }
    if (distill_token)  // nothing merges into the distillation token (column 0)
      for (int64_t k = 0; k < d; ++k) b[k * tc] = qnan;
  }
  return h;
}

// ---------------------------------------------------------------------------------------
// Stage 2, row max + argmax of the scores A·Bᵀ, parallel over (group, block of rows),
// then the reference's answers for the rows it defines by masks or NaN: a NaN row or any
// NaN unmasked column makes the row max NaN and the argmax the last column; the class
// token (A row 0) gets -inf, column 0.
// ---------------------------------------------------------------------------------------
RowMax row_max(const Halves& h, bool class_token, bool distill_token,
               const scores::Kernel& kern) {
  const int64_t g = h.g, n = h.n, d = h.d, na = h.na, nb = h.nb, nbp = h.nbp;
  RowMax m;
  m.max.resize(size_t(g * na));
  m.idx.resize(size_t(g * na));
  constexpr int64_t kRows = 24;
  const int64_t blocks = (na + kRows - 1) / kRows;
  at::parallel_for(0, g * blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t gi = blk / blocks, i0 = (blk % blocks) * kRows;
      const int64_t i1 = std::min(na, i0 + kRows);
      scores::Problem p{h.a.data() + gi * na * d, h.bt.data() + gi * d * nbp, d, nbp};
      kern.row_max(p, i0, i1, m.max.data() + gi * na, m.idx.data() + gi * na);
    }
  });
  const uint8_t* nan_tok = h.nan_tok.data();
  for (int64_t gi = 0; gi < g; ++gi) {
    float* mx = m.max.data() + gi * na;
    int64_t* ix = m.idx.data() + gi * na;
    bool nan_col = false;
    for (int64_t j = distill_token ? 1 : 0; j < nb; ++j) nan_col |= nan_tok[gi * n + 2 * j + 1] != 0;
    for (int64_t i = 0; i < na; ++i) {
      if (nan_col || nan_tok[gi * n + 2 * i]) {
        mx[i] = std::numeric_limits<float>::quiet_NaN();
        ix[i] = nb - 1;
      }
    }
    if (class_token) {  // the class token is never a source
      mx[0] = -std::numeric_limits<float>::infinity();
      ix[0] = 0;
    }
  }
  return m;
}

namespace {

// Stage 3, rank one group: order[0 .. r) the sources, best first (larger row max first,
// NaN largest, equal values by index); order[r .. na) the unmerged A tokens in output
// order: ascending with a class token (only the top r need ordering), else rank order.
void rank_group(const float* mx, int64_t na, int64_t r, bool class_token, int64_t* order,
                std::vector<uint8_t>& is_src) {
  for (int64_t i = 0; i < na; ++i) order[i] = i;
  Before before{mx};
  if (class_token) {
    std::nth_element(order, order + r, order + na, before);
    std::sort(order, order + r, before);
    is_src.assign(na, 0);
    for (int64_t t = 0; t < r; ++t) is_src[order[t]] = 1;
    int64_t u = r;
    for (int64_t i = 0; i < na; ++i)
      if (!is_src[i]) order[u++] = i;
  } else {
    std::sort(order, order + na, before);
  }
}

// Stage 4, the output layout of one group (reference._layout): out [unmerged A, B], or
// [cls, dist, other A, other B]; each source's position, output row and score.
void layout_group(const int64_t* order, const float* mx, const int64_t* ix, int64_t na,
                  int64_t nb, int64_t r, bool distill_token, int64_t* out, int64_t* src,
                  int64_t* dst, float* score) {
  const int64_t n_unm = na - r;
  int64_t o = 0;
  if (distill_token) {
    out[o++] = 2 * order[r];
    out[o++] = 1;
    for (int64_t u = 1; u < n_unm; ++u) out[o++] = 2 * order[r + u];
    for (int64_t j = 1; j < nb; ++j) out[o++] = 2 * j + 1;
  } else {
    for (int64_t u = 0; u < n_unm; ++u) out[o++] = 2 * order[r + u];
    for (int64_t j = 0; j < nb; ++j) out[o++] = 2 * j + 1;
  }
  for (int64_t t = 0; t < r; ++t) {
    const int64_t i = order[t], dst_b = ix[i];
    src[t] = 2 * i;
    score[t] = mx[i];
    dst[t] = (distill_token && dst_b == 0) ? 1 : n_unm + dst_b;
  }
}

}  // namespace

// Stages 3 and 4 for every group (parallel over groups): the matching tensors.
Matching rank_layout(const RowMax& m, int64_t g, int64_t n, int64_t r, bool class_token,
                     bool distill_token, const at::TensorOptions& options) {
  const int64_t na = (n + 1) / 2, nb = n / 2, n_out = n - r;
  auto lopt = options.dtype(at::kLong);
  at::Tensor out_idx = at::empty({g, n_out}, lopt), src_idx = at::empty({g, r}, lopt),
             dst_pos = at::empty({g, r}, lopt);
  at::Tensor src_score = at::empty({g, r}, options.dtype(at::kFloat));
  int64_t* po = out_idx.data_ptr<int64_t>();
  int64_t* ps = src_idx.data_ptr<int64_t>();
  int64_t* pd = dst_pos.data_ptr<int64_t>();
  float* pv = src_score.data_ptr<float>();
  at::parallel_for(0, g, 1, [&](int64_t g0, int64_t g1) {
    std::vector<int64_t> order(na);
    std::vector<uint8_t> is_src;
    for (int64_t gi = g0; gi < g1; ++gi) {
      const float* mx = m.max.data() + gi * na;
      rank_group(mx, na, r, class_token, order.data(), is_src);
      layout_group(order.data(), mx, m.idx.data() + gi * na, na, nb, r, distill_token,
                   po + gi * n_out, ps + gi * r, pd + gi * r, pv + gi * r);
    }
  });
  return {out_idx, src_idx, dst_pos, src_score};
}

void check_match_args(const at::Tensor& metric, int64_t r, bool class_token, bool distill_token) {
  TORCH_CHECK(metric.dim() == 3, "metric must be [G, N, d], got ", metric.sizes());
  TORCH_CHECK(at::isFloatingType(metric.scalar_type()), "metric must be a float tensor, got ",
              metric.scalar_type());
  TORCH_CHECK(!distill_token || class_token, "distill_token needs class_token");
  const int64_t n = metric.size(1);
  TORCH_CHECK(metric.size(2) >= 1, "metric must have a last dim >= 1");
  const int64_t prot = int64_t(class_token) + int64_t(distill_token);
  TORCH_CHECK(r >= 1 && r <= (n - prot) / 2, "r must be in [1, (N - protected) // 2 = ",
              (n - prot) / 2, "], got ", r);
}

// The matching: the four stages in order.
Matching match_cpu(const at::Tensor& metric, int64_t r, bool class_token, bool distill_token) {
  check_match_args(metric, r, class_token, distill_token);
  const scores::Kernel& kern = scores::best_kernel();
  const Halves h = normalise_pack(metric, distill_token, kern.tile_cols);
  const RowMax m = row_max(h, class_token, distill_token, kern);
  return rank_layout(m, h.g, h.n, r, class_token, distill_token, metric.options());
}

TORCH_LIBRARY_IMPL(vtome, CPU, m) { m.impl("match", &match_cpu); }

}  // namespace vtome
