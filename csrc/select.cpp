// FluxViT token selection on the CPU: vtome::select(x, k_per_group, groups) -> (kept, index).
//
// The same tokens as vtome_kernels.reference.select, bit for bit:
// - score of a patch = float32 sum over c = 0..C-1, in order, of d * d with
//   d = float(cur) - float(prev), one rounding per multiply and per add (no FMA: this
//   file is compiled with floating-point contraction off), so identical frames tie
//   exactly; a group's first frame scores the pair (second, first); a one-frame group
//   scores 0;
// - per group the top k_per_group scores, ties to the lower position, NaN above +inf
//   above every number (torch.sort's order); kept in ascending position order.
// x is validated by vtome_kernels.select; the checks here guard the op's own contract.
// The fake (shape) implementation is registered in vtome_kernels/cpp.py.

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kTile = 16;  // patches scored together (independent accumulators)

// Scores of the patches [l0, l0 + n) of one frame pair: out[j] = sum over c, in order, of
// (cur - prev)^2, with kTile independent patch accumulators. Three loop shapes compute the
// same values (each lane adds its squares in channel order); which is fastest depends on
// the dtype (measured on AVX-512, one thread: 16-bit inputs gain from converting a whole
// tile first, float32 from the direct loop).
template <typename scalar_t>
void score_tile_any(const scalar_t* cur, const scalar_t* prev, int64_t n, int64_t C, float* out) {
  float acc[kTile] = {0.0f};
  float sq[kTile][kTile] = {{0.0f}};  // [channel][patch]; lanes j >= n stay 0
  for (int64_t c0 = 0; c0 < C; c0 += kTile) {
    const int64_t nc = std::min<int64_t>(kTile, C - c0);
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t* a = cur + j * C + c0;
      const scalar_t* p = prev + j * C + c0;
      for (int64_t c = 0; c < nc; ++c) {
        const float d = static_cast<float>(a[c]) - static_cast<float>(p[c]);
        sq[c][j] = d * d;
      }
    }
    for (int64_t c = 0; c < nc; ++c) {
      for (int64_t j = 0; j < kTile; ++j) acc[j] = acc[j] + sq[c][j];
    }
  }
  for (int64_t j = 0; j < n; ++j) out[j] = acc[j];
}

// A full tile of 16-bit values: convert and square a 16 x 16 block, then add by channel.
template <typename scalar_t>
void score_tile_block(const scalar_t* cur, const scalar_t* prev, int64_t C, float* out) {
  float acc[kTile] = {0.0f};
  alignas(64) float sq[kTile][kTile];  // [patch][channel]
  for (int64_t c0 = 0; c0 < C; c0 += kTile) {
    for (int64_t j = 0; j < kTile; ++j) {
      const scalar_t* a = cur + j * C + c0;
      const scalar_t* p = prev + j * C + c0;
      for (int64_t c = 0; c < kTile; ++c) {
        const float d = static_cast<float>(a[c]) - static_cast<float>(p[c]);
        sq[j][c] = d * d;
      }
    }
    for (int64_t c = 0; c < kTile; ++c) {
      for (int64_t j = 0; j < kTile; ++j) acc[j] = acc[j] + sq[j][c];
    }
  }
  for (int64_t j = 0; j < kTile; ++j) out[j] = acc[j];
}

// A full tile of 32/64-bit values: channel by channel, all patches at once.
template <typename scalar_t>
void score_tile_direct(const scalar_t* cur, const scalar_t* prev, int64_t C, float* out) {
  float acc[kTile] = {0.0f};
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t j = 0; j < kTile; ++j) {
      const float d = static_cast<float>(cur[j * C + c]) - static_cast<float>(prev[j * C + c]);
      acc[j] = acc[j] + d * d;
    }
  }
  for (int64_t j = 0; j < kTile; ++j) out[j] = acc[j];
}

template <typename scalar_t>
void score_tile(const scalar_t* cur, const scalar_t* prev, int64_t n, int64_t C, float* out) {
  if (n == kTile && sizeof(scalar_t) >= 4) return score_tile_direct(cur, prev, C, out);
  if (n == kTile && C % kTile == 0) return score_tile_block(cur, prev, C, out);
  score_tile_any(cur, prev, n, C, out);
}

template <typename scalar_t>
void scores(const scalar_t* x, int64_t B, int64_t T, int64_t L, int64_t C, int64_t F,
            float* out) {
  at::parallel_for(0, B * T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      float* dst = out + bt * L;
      if (F == 1) {
        std::fill(dst, dst + L, 0.0f);
        continue;
      }
      const int64_t t = bt % T;
      const int64_t cur = (t % F == 0) ? bt + 1 : bt;  // a group's first frame: next pair
      const scalar_t* xc = x + cur * L * C;
      const scalar_t* xp = xc - L * C;
      for (int64_t l0 = 0; l0 < L; l0 += kTile) {
        score_tile(xc + l0 * C, xp + l0 * C, std::min<int64_t>(kTile, L - l0), C, dst + l0);
      }
    }
  });
}

// Ranking key: the bit pattern of a score >= 0 orders like the float; NaN ranks above +inf.
inline int32_t rank_key(float s) {
  if (s != s) return 0x7FC00000;
  int32_t k;
  std::memcpy(&k, &s, sizeof(k));
  return k;
}

std::tuple<at::Tensor, at::Tensor> select_cpu(const at::Tensor& x_in, int64_t k_per_group,
                                              int64_t groups) {
  TORCH_CHECK(x_in.dim() == 4, "vtome::select: x must be 4-D [B, T, L, C], got ", x_in.sizes());
  TORCH_CHECK(x_in.device().is_cpu(), "vtome::select: x must be a CPU tensor");
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), T = x.size(1), L = x.size(2), C = x.size(3);
  TORCH_CHECK(groups >= 1 && T % groups == 0, "vtome::select: groups must divide T=", T,
              ", got ", groups);
  const int64_t F = T / groups, NG = F * L;
  TORCH_CHECK(k_per_group >= 1 && k_per_group <= NG,
              "vtome::select: k_per_group must be in [1, ", NG, "], got ", k_per_group);
  const int64_t K = groups * k_per_group;

  at::Tensor score = at::empty({B, T, L}, x.options().dtype(at::kFloat));
  at::Tensor kept = at::empty({B, K, C}, x.options());
  at::Tensor index = at::empty({B, K}, x.options().dtype(at::kLong));
  if (B == 0) return {kept, index};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "vtome_select", [&] {
    scores<scalar_t>(x.const_data_ptr<scalar_t>(), B, T, L, C, F, score.mutable_data_ptr<float>());
  });

  const float* s = score.const_data_ptr<float>();
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(kept.mutable_data_ptr());
  int64_t* idx = index.mutable_data_ptr<int64_t>();
  const int64_t row = C * x.element_size();
  at::parallel_for(0, B * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> key(NG);
    std::vector<int64_t> order(NG);
    for (int64_t bg = begin; bg < end; ++bg) {
      const float* sg = s + bg * NG;  // groups are consecutive frames: contiguous scores
      for (int64_t i = 0; i < NG; ++i) key[i] = rank_key(sg[i]);
      std::iota(order.begin(), order.end(), int64_t{0});
      auto before = [&](int64_t i, int64_t j) {  // higher key first, then lower position
        return key[i] > key[j] || (key[i] == key[j] && i < j);
      };
      std::nth_element(order.begin(), order.begin() + (k_per_group - 1), order.end(), before);
      std::sort(order.begin(), order.begin() + k_per_group);
      const int64_t b = bg / groups, g = bg % groups;
      for (int64_t i = 0; i < k_per_group; ++i) {
        const int64_t pos = g * NG + order[i];  // position in the clip's T·L grid
        const int64_t out = bg * k_per_group + i;
        idx[out] = pos;
        std::memcpy(dst + out * row, src + (b * T * L + pos) * row, row);
      }
    }
  });
  return {kept, index};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vtome, m) {
  m.def("select(Tensor x, int k_per_group, int groups) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vtome, CPU, m) {
  m.impl("select", &select_cpu);
}
