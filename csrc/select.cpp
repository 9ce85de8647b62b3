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

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kTile = 16;  // patches scored together (independent accumulators)

// Scores of the patches [l0, l0 + n) of one frame pair: out[j] = sum over c, in order, of
// (cur - prev)^2, with kTile independent patch accumulators. Three loop shapes compute the
// same values (each lane adds its squares in channel order); which is fastest depends on
// the dtype (measured on AVX-512, one thread: 16-bit inputs gain from converting a whole
// tile first, float32 from the direct loop).
//
// Through a kTile x kTile block of squares, kTile channels at a time:
// - kFull = false, any tile (n <= kTile patches, any C): block [channel][patch], lanes
//   j >= n stay 0 (and are added as zeros);
// - kFull = true, a full tile of 16-bit values (n = kTile, C % kTile == 0): convert and
//   square a whole 16 x 16 block [patch][channel], then add by channel.
template <bool kFull, typename scalar_t>
void score_tile_block(const scalar_t* cur, const scalar_t* prev, int64_t n, int64_t C,
                      float* out) {
  if constexpr (kFull) n = kTile;
  float acc[kTile] = {0.0f};
  alignas(kFull ? 64 : alignof(float)) float sq[kTile][kTile];  // full: cache-line aligned
  if constexpr (!kFull) std::fill(&sq[0][0], &sq[0][0] + kTile * kTile, 0.0f);
  auto at = [&](int64_t j, int64_t c) -> float& {  // the square of patch j, channel c
    if constexpr (kFull) return sq[j][c];
    else return sq[c][j];
  };
  for (int64_t c0 = 0; c0 < C; c0 += kTile) {
    const int64_t nc = kFull ? kTile : std::min<int64_t>(kTile, C - c0);
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t* a = cur + j * C + c0;
      const scalar_t* p = prev + j * C + c0;
      for (int64_t c = 0; c < nc; ++c) {
        const float d = static_cast<float>(a[c]) - static_cast<float>(p[c]);
        at(j, c) = d * d;
      }
    }
    for (int64_t c = 0; c < nc; ++c) {
      for (int64_t j = 0; j < kTile; ++j) acc[j] = acc[j] + at(j, c);
    }
  }
  for (int64_t j = 0; j < n; ++j) out[j] = acc[j];
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

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VTOME_SELECT_AVX2 1
// AVX2 path for float32 and bfloat16 (the module's baseline is x86-64; these functions are
// compiled for AVX2 and taken only when the CPU has it). Eight patches at a time: the
// squared differences of an 8 x 8 block (rows = patches) are transposed in registers so
// each channel's squares of the eight patches form one vector, then added channel by
// channel: every lane still sums its own squares in channel order, one rounding per
// multiply and per add (separate vmulps / vaddps, no FMA), exactly like the reference.
__attribute__((target("avx2"))) inline __m256 load8(const float* p) {
  return _mm256_loadu_ps(p);
}
__attribute__((target("avx2"))) inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  // exact
}

template <typename scalar_t>
__attribute__((target("avx2"))) void score_tile8_avx2(const scalar_t* cur, const scalar_t* prev,
                                                      int64_t C, float* out) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t c0 = 0; c0 < C; c0 += 8) {
    __m256 r[8];
    for (int j = 0; j < 8; ++j) {
      const __m256 d = _mm256_sub_ps(load8(cur + j * C + c0), load8(prev + j * C + c0));
      r[j] = _mm256_mul_ps(d, d);
    }
    // 8 x 8 transpose: t[c] holds channel c0 + c of patches 0..7.
    const __m256 a0 = _mm256_unpacklo_ps(r[0], r[1]), a1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 a2 = _mm256_unpacklo_ps(r[2], r[3]), a3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 a4 = _mm256_unpacklo_ps(r[4], r[5]), a5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 a6 = _mm256_unpacklo_ps(r[6], r[7]), a7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 b0 = _mm256_shuffle_ps(a0, a2, 0x44), b1 = _mm256_shuffle_ps(a0, a2, 0xEE);
    const __m256 b2 = _mm256_shuffle_ps(a1, a3, 0x44), b3 = _mm256_shuffle_ps(a1, a3, 0xEE);
    const __m256 b4 = _mm256_shuffle_ps(a4, a6, 0x44), b5 = _mm256_shuffle_ps(a4, a6, 0xEE);
    const __m256 b6 = _mm256_shuffle_ps(a5, a7, 0x44), b7 = _mm256_shuffle_ps(a5, a7, 0xEE);
    acc = _mm256_add_ps(acc, _mm256_permute2f128_ps(b0, b4, 0x20));  // channel c0 + 0
    acc = _mm256_add_ps(acc, _mm256_permute2f128_ps(b1, b5, 0x20));  // + 1
    acc = _mm256_add_ps(acc, _mm256_permute2f128_ps(b2, b6, 0x20));  // + 2
    acc = _mm256_add_ps(acc, _mm256_permute2f128_ps(b3, b7, 0x20));  // + 3
    acc = _mm256_add_ps(acc, _mm256_permute2f128_ps(b0, b4, 0x31));  // + 4
    acc = _mm256_add_ps(acc, _mm256_permute2f128_ps(b1, b5, 0x31));  // + 5
    acc = _mm256_add_ps(acc, _mm256_permute2f128_ps(b2, b6, 0x31));  // + 6
    acc = _mm256_add_ps(acc, _mm256_permute2f128_ps(b3, b7, 0x31));  // + 7
  }
  _mm256_storeu_ps(out, acc);
}

inline bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#endif

template <typename scalar_t>
void score_tile(const scalar_t* cur, const scalar_t* prev, int64_t n, int64_t C, float* out) {
#ifdef VTOME_SELECT_AVX2
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
    if (C % 8 == 0 && has_avx2()) {
      int64_t j = 0;
      for (; j + 8 <= n; j += 8) score_tile8_avx2(cur + j * C, prev + j * C, C, out + j);
      if (j < n) score_tile_block<false>(cur + j * C, prev + j * C, n - j, C, out + j);
      return;
    }
  }
#endif
  if (n == kTile && sizeof(scalar_t) >= 4) return score_tile_direct(cur, prev, C, out);
  if (n == kTile && C % kTile == 0) return score_tile_block<true>(cur, prev, n, C, out);
  score_tile_block<false>(cur, prev, n, C, out);
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

// The scores alone [B, T, L] float32 (tests compare them bit for bit with the reference).
at::Tensor select_scores_cpu(const at::Tensor& x_in, int64_t groups) {
  TORCH_CHECK(x_in.dim() == 4, "vtome::select_scores: x must be 4-D [B, T, L, C], got ",
              x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), T = x.size(1), L = x.size(2), C = x.size(3);
  TORCH_CHECK(groups >= 1 && T % groups == 0, "vtome::select_scores: groups must divide T=", T,
              ", got ", groups);
  at::Tensor score = at::empty({B, T, L}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "vtome_select_scores", [&] {
    scores<scalar_t>(x.const_data_ptr<scalar_t>(), B, T, L, C, T / groups,
                     score.mutable_data_ptr<float>());
  });
  return score;
}

}  // namespace

TORCH_LIBRARY_IMPL(vtome, CPU, m) {
  m.impl("select", &select_cpu);
  m.impl("select_scores", &select_scores_cpu);
}
