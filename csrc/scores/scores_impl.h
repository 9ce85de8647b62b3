// The score kernel, written once with GCC vector extensions and compiled once per
// instruction set (scores_generic.cpp, scores_avx2.cpp, scores_avx512.cpp). Include it
// only from those files: everything here is internal (anonymous namespace, no standard
// library templates) so that no symbol compiled for a wide instruction set can be picked
// by the linker for code that runs on a narrower CPU.
#pragma once
#include <cstdint>

#include "scores.h"

namespace {

// W lanes of float and of int32 of the same total width, unaligned loads allowed.
template <int W>
struct Vec {
  typedef float F __attribute__((vector_size(W * 4), aligned(4)));
  typedef int32_t I __attribute__((vector_size(W * 4), aligned(4)));
};

// Broadcast (written out: GCC turns these into one vbroadcastss; a lane loop or
// "vector + scalar" costs shuffles or an extra add).
template <int W>
inline __attribute__((always_inline)) typename Vec<W>::F splat(float v);
template <>
inline __attribute__((always_inline)) Vec<4>::F splat<4>(float v) {
  return Vec<4>::F{v, v, v, v};
}
template <>
inline __attribute__((always_inline)) Vec<8>::F splat<8>(float v) {
  return Vec<8>::F{v, v, v, v, v, v, v, v};
}
template <>
inline __attribute__((always_inline)) Vec<16>::F splat<16>(float v) {
  return Vec<16>::F{v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v};
}

// Scores of ROWS rows x (NV * W) columns starting at column j0, folded into the
// per-lane running maxima (strict >: an earlier column keeps a tie within a lane).
// bt is the packed panel of these columns: element (k, jj) at bt[k * NV * W + jj].
template <int W, int ROWS, int NV>
inline __attribute__((always_inline)) void tile(const float* a, int64_t d, const float* bt,
                                                int64_t j0,
                                                typename Vec<W>::F* bestv,
                                                typename Vec<W>::I* bestj) {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::I I;
  F acc[ROWS][NV];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = F{} * 0.0f;
  const float* bk = bt;
  for (int64_t k = 0; k < d; ++k, bk += NV * W) {
    F b[NV];
    for (int v = 0; v < NV; ++v) b[v] = *reinterpret_cast<const F*>(bk + v * W);
    for (int r = 0; r < ROWS; ++r) {
      const F ar = splat<W>(a[r * d + k]);
      for (int v = 0; v < NV; ++v) {
        const F prod = ar * b[v];  // rounded product, then a rounded add: no FMA
        acc[r][v] = acc[r][v] + prod;
      }
    }
  }
  I lane;
  for (int l = 0; l < W; ++l) lane[l] = l;
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < NV; ++v) {
      const I cols = lane + (int32_t)(j0 + v * W);
      const I win = acc[r][v] > bestv[r * NV + v];  // false for NaN
      bestv[r * NV + v] = win ? acc[r][v] : bestv[r * NV + v];
      bestj[r * NV + v] = win ? cols : bestj[r * NV + v];
    }
}

// Rows [i, i + ROWS): every column tile, then a reduction of the lanes of each row.
template <int W, int ROWS, int NV>
void rows_block(const vtome::scores::Problem& p, int64_t i, float* best, int64_t* arg) {
  typedef typename Vec<W>::F F;
  typedef typename Vec<W>::I I;
  F bestv[ROWS * NV];
  I bestj[ROWS * NV];
  const float ninf = -__builtin_inff();
  for (int t = 0; t < ROWS * NV; ++t) {
    bestv[t] = splat<W>(ninf);
    bestj[t] = I{} * 0;
  }
  const float* a = p.a + i * p.d;
  for (int64_t j0 = 0; j0 < p.nbp; j0 += NV * W)
    tile<W, ROWS, NV>(a, p.d, p.bt + j0 * p.d, j0, bestv, bestj);
  for (int r = 0; r < ROWS; ++r) {
    float m = ninf;
    int32_t mj = 0;
    for (int v = 0; v < NV; ++v)
      for (int l = 0; l < W; ++l) {
        const float s = bestv[r * NV + v][l];
        const int32_t j = bestj[r * NV + v][l];
        if (s > m || (s == m && j < mj)) {
          m = s;
          mj = j;
        }
      }
    best[i + r] = m;
    arg[i + r] = mj;
  }
}

template <int W, int ROWS, int NV>
void row_max_impl(const vtome::scores::Problem& p, int64_t i0, int64_t i1, float* best, int64_t* arg) {
  int64_t i = i0;
  for (; i + ROWS <= i1; i += ROWS) rows_block<W, ROWS, NV>(p, i, best, arg);
  for (; i < i1; ++i) rows_block<W, 1, NV>(p, i, best, arg);
}

}  // namespace
