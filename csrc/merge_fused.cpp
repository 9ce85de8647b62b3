// vtome::merge_fused on CPU: match + merge of mode "merge" in one op (what vt.merge does
// for one layer). The stages of vtome::match (match.h) then the merge kernel of
// vtome::merge, in one call: it saves the per-call work of a plan (object, checks, two
// dispatches), which is a large share at ViT-B size (BENCHMARKS.md, C++ CPU backend).
// Returns (x_out, size_out, out_idx, src_idx, dst_pos): the indices feed the backward.
#include <torch/library.h>

#include "match.h"

namespace vtome {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_fused_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& size, const at::Tensor& metric,
    int64_t r, bool class_token, bool distill_token) {
  TORCH_CHECK(x.dim() == 3 && metric.dim() == 3 && x.size(0) == metric.size(0) &&
                  x.size(1) == metric.size(1),
              "x [G, N, C] and metric [G, N, d] must share G and N, got ", x.sizes(), " and ",
              metric.sizes());
  check_match_args(metric, r, class_token, distill_token);
  const scores::Kernel& kern = scores::best_kernel();
  const Halves h = normalise_pack(metric, distill_token, kern.tile_cols);
  const RowMax m = row_max(h, class_token, distill_token, kern);
  auto [out_idx, src_idx, dst_pos, src_score] =
      rank_layout(m, h.g, h.n, r, class_token, distill_token, metric.options());
  auto [x_out, size_out] = merge_cpu_impl(x, size.has_value() ? *size : at::Tensor(), out_idx,
                                          src_idx, dst_pos, c10::nullopt);
  return {x_out, size_out, out_idx, src_idx, dst_pos};
}

}  // namespace

TORCH_LIBRARY_IMPL(vtome, CPU, m) { m.impl("merge_fused", &merge_fused_cpu); }

}  // namespace vtome
