// The stages of the CPU matching (reference.match), which vtome::match (match.cpp) and
// vtome::merge_fused (merge_fused.cpp) compose:
//   normalise_pack -> row_max -> rank_layout (rank each group, then write its layout).
#pragma once
#include <tuple>
#include <vector>

#include "common.h"
#include "scores/scores.h"

namespace vtome {

// Stage 1: the normalised halves of every group. A rows [G, na, d] contiguous; B in
// column panels of tc columns [G, nbp / tc, d, tc] (scores::bt_index), padding NaN.
struct Halves {
  int64_t g = 0, n = 0, d = 0, na = 0, nb = 0, nbp = 0, tc = 1;
  std::vector<float> a, bt;
  std::vector<uint8_t> nan_tok;  // [G, N]: the token's normalised vector has a NaN
};
Halves normalise_pack(const at::Tensor& metric, bool distill_token, int64_t tc);

// Stage 2: every A row's best score and the lowest B column reaching it [G, na].
struct RowMax {
  std::vector<float> max;
  std::vector<int64_t> idx;
};
RowMax row_max(const Halves& h, bool class_token, bool distill_token, const scores::Kernel& kern);

// Stages 3 and 4: the ranking of the A rows and the output layout of every group:
// (out_idx [G, N - r], src_idx [G, r], dst_pos [G, r], src_score [G, r]).
using Matching = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
Matching rank_layout(const RowMax& m, int64_t g, int64_t n, int64_t r, bool class_token,
                     bool distill_token, const at::TensorOptions& options);

// The argument checks of vtome::match (1 <= r <= (N - protected) // 2, ...).
void check_match_args(const at::Tensor& metric, int64_t r, bool class_token, bool distill_token);

// vtome::match on CPU: the stages in order.
Matching match_cpu(const at::Tensor& metric, int64_t r, bool class_token, bool distill_token);

}  // namespace vtome
