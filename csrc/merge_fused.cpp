// vtome::merge_fused: match + merge of mode "merge" in one op (what vt.merge does for one
// layer), for the fast path of merge.py. Same kernels as vtome::match and vtome::merge, one
// call: it saves the per-call work of the general path (plan object, checks, two
// dispatches), which is a large share at ViT-B size (BENCHMARKS.md, C++ CPU backend).
// Returns (x_out, size_out, out_idx, src_idx, dst_pos): the indices feed the backward.
#include <torch/library.h>

#include "common.h"

namespace vtome {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> merge_fused_cpu(
    const at::Tensor& x, const c10::optional<at::Tensor>& size, const at::Tensor& metric,
    int64_t r, bool class_token, bool distill_token) {
  TORCH_CHECK(x.dim() == 3 && metric.dim() == 3 && x.size(0) == metric.size(0) &&
                  x.size(1) == metric.size(1),
              "x [G, N, C] and metric [G, N, d] must share G and N, got ", x.sizes(), " and ",
              metric.sizes());
  auto [out_idx, src_idx, dst_pos, src_score] = match_cpu(metric, r, class_token, distill_token);
  auto [x_out, size_out] = merge_cpu_impl(x, size.has_value() ? *size : at::Tensor(), out_idx,
                                          src_idx, dst_pos, c10::nullopt);
  return {x_out, size_out, out_idx, src_idx, dst_pos};
}

}  // namespace

TORCH_LIBRARY_IMPL(vtome, CPU, m) { m.impl("merge_fused", &merge_fused_cpu); }

}  // namespace vtome
