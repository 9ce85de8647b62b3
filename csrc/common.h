// Helpers shared by the op files of vtome_kernels._C.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

namespace vtome {

// Accumulation type of a merge (reference.acc_dtype): float32, float64 kept for gradcheck.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

inline void check_index(const at::Tensor& t, const char* name, int64_t g, int64_t n) {
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == g && t.size(1) == n, name, " must have shape [", g,
              ", ", n, "], got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

// For every output row of one group, the ranks of the sources going into it (CSR, rank
// order kept): sources of row o are list[start[o] .. start[o + 1]).
struct Incoming {
  std::vector<int64_t> start, list;
};

inline void incoming(const int64_t* dst, int64_t r, int64_t n_out, Incoming& in) {
  in.start.assign(n_out + 1, 0);
  in.list.resize(r);
  for (int64_t j = 0; j < r; ++j) {
    TORCH_CHECK(dst[j] >= 0 && dst[j] < n_out, "dst_pos out of range: ", dst[j], " not in [0, ",
                n_out, ")");
    ++in.start[dst[j] + 1];
  }
  for (int64_t o = 0; o < n_out; ++o) in.start[o + 1] += in.start[o];
  std::vector<int64_t> fill(in.start.begin(), in.start.end() - 1);
  for (int64_t j = 0; j < r; ++j) in.list[fill[dst[j]]++] = j;
}

// The merge kernel that merge_fused.cpp builds on (merge.cpp); match.h has the matching's.
std::tuple<at::Tensor, at::Tensor> merge_cpu_impl(const at::Tensor& x, const at::Tensor& size,
                                                  const at::Tensor& out_idx,
                                                  const at::Tensor& src_idx,
                                                  const at::Tensor& dst_pos,
                                                  const c10::optional<at::Tensor>& src_merged);

}  // namespace vtome
