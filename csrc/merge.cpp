// vtome::merge (+ merge_backward), vtome::merge_source, vtome::unmerge (+ unmerge_backward):
// applying a matching (reference.merge / merge_source / unmerge).
//
// Every output row is built in one pass by the thread that owns it: its base token plus
// the sources whose dst_pos is that row (found through a per-group CSR, sources in rank
// order), so nothing is scattered and no row is written twice. Rows that receive no
// merged source are copied bit for bit; merged rows accumulate in float32 (float64 for
// float64 inputs). Every input position is the base of one output row or one source, so
// the backward writes each input row exactly once too.
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <type_traits>

#include "common.h"

namespace vtome {
namespace {

struct Plan {  // one matching, validated, with the CSR of every group
  int64_t g, n, n_out, r;
  const int64_t *out_idx, *src_idx;
  const bool* merged;  // null: every source merges
  std::vector<Incoming> in;
};

Plan make_plan(int64_t g, int64_t n, const at::Tensor& out_idx, const at::Tensor& src_idx,
               const at::Tensor& dst_pos, const c10::optional<at::Tensor>& src_merged) {
  TORCH_CHECK(out_idx.dim() == 2 && out_idx.size(0) == g, "out_idx must be [G, N'], got ",
              out_idx.sizes());
  const int64_t n_out = out_idx.size(1), r = src_idx.dim() == 2 ? src_idx.size(1) : -1;
  check_index(out_idx, "out_idx", g, n_out);
  check_index(src_idx, "src_idx", g, r);
  check_index(dst_pos, "dst_pos", g, r);
  TORCH_CHECK(n_out + r == n, "out_idx and src_idx must cover the ", n, " tokens, got ", n_out,
              " + ", r);
  TORCH_CHECK(out_idx.is_contiguous() && src_idx.is_contiguous() && dst_pos.is_contiguous(),
              "index tensors must be contiguous");
  Plan p{g, n, n_out, r, out_idx.data_ptr<int64_t>(), src_idx.data_ptr<int64_t>(), nullptr, {}};
  if (src_merged.has_value() && src_merged->defined()) {
    const at::Tensor& m = *src_merged;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == g && m.size(1) == r &&
                    m.is_contiguous(),
                "src_merged must be a contiguous bool [", g, ", ", r, "], got ", m.scalar_type(),
                " ", m.sizes());
    p.merged = m.data_ptr<bool>();
  }
  for (int64_t t = 0; t < g * n_out; ++t)
    TORCH_CHECK(p.out_idx[t] >= 0 && p.out_idx[t] < n, "out_idx out of range: ", p.out_idx[t]);
  for (int64_t t = 0; t < g * r; ++t)
    TORCH_CHECK(p.src_idx[t] >= 0 && p.src_idx[t] < n, "src_idx out of range: ", p.src_idx[t]);
  p.in.resize(g);
  const int64_t* dst = dst_pos.data_ptr<int64_t>();
  for (int64_t gi = 0; gi < g; ++gi) incoming(dst + gi * r, r, n_out, p.in[gi]);
  return p;
}

inline bool merges(const Plan& p, int64_t gi, int64_t j) {
  return p.merged == nullptr || p.merged[gi * p.r + j];
}

// Output row t of a plan (t = gi * n_out + o): group gi, position o, base token b, and the
// ranks j of the sources whose dst_pos is o (rank order): `for (int64_t j : row)`.
struct OutRow {
  int64_t gi, o, b;
  const int64_t *first, *last;
  const int64_t* begin() const { return first; }
  const int64_t* end() const { return last; }
  bool receives() const { return first != last; }
};

inline OutRow out_row(const Plan& p, int64_t t) {
  const int64_t gi = t / p.n_out, o = t % p.n_out;
  const Incoming& in = p.in[gi];
  const int64_t* list = in.list.data();
  return {gi, o, p.out_idx[t], list + in.start[o], list + in.start[o + 1]};
}

inline int64_t src_pos(const Plan& p, int64_t gi, int64_t j) { return p.src_idx[gi * p.r + j]; }

// Rows of a [G, N, C] tensor whose last dim is contiguous (other strides free).
template <typename T>
struct Rows {
  T* base;
  int64_t s0, s1;
  T* row(int64_t gi, int64_t i) const { return base + gi * s0 + i * s1; }
};

template <typename T>  // T or const T
Rows<T> rows(const at::Tensor& t) {
  return {t.data_ptr<std::remove_const_t<T>>(), t.stride(0), t.stride(1)};
}

// Rows per parallel task: about 16k values of width-wide rows, at least one row.
inline int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

// The sums of a merged row, shared by merge and its backward: acc = Σ x_k s_k and the
// returned tot = Σ s_k over the row's members (its base, weight sb, then its merged sources
// in rank order; sp null: every size is 1), accumulated in acc_t. A row that no source
// merges into leaves acc untouched and `received` false (the caller copies it bit for bit);
// every discarded source is passed to discard(src).
template <typename scalar_t, typename acc_t, typename Discard>
inline acc_t weighted_sum(const Plan& p, const OutRow& row, const Rows<const scalar_t>& xr,
                          const acc_t* sp, acc_t sb, int64_t c, acc_t* acc, bool& received,
                          Discard&& discard) {
  const scalar_t* xb = xr.row(row.gi, row.b);
  acc_t tot = sb;
  received = false;
  for (const int64_t j : row) {
    const int64_t src = src_pos(p, row.gi, j);
    if (!merges(p, row.gi, j)) {
      discard(src);
      continue;
    }
    const acc_t w = sp ? sp[row.gi * p.n + src] : acc_t(1);
    const scalar_t* xs = xr.row(row.gi, src);
    if (!received) {
      for (int64_t k = 0; k < c; ++k) acc[k] = static_cast<acc_t>(xb[k]) * sb;
      received = true;
    }
    for (int64_t k = 0; k < c; ++k) acc[k] += static_cast<acc_t>(xs[k]) * w;
    tot += w;
  }
  return tot;
}

at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.size(2) <= 1 || t.stride(2) == 1 ? t : t.contiguous();
}

void check_rows(const at::Tensor& t, const char* name, int64_t g, int64_t n) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == g && t.size(1) == n, name, " must be [", g, ", ", n,
              ", C], got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

// ---------------------------------------------------------------------------------------
// merge
// ---------------------------------------------------------------------------------------
}  // namespace

// size undefined: all ones, and the returned sizes are float32 (API.md: size=None).
std::tuple<at::Tensor, at::Tensor> merge_cpu_impl(const at::Tensor& x_in, const at::Tensor& size,
                                                  const at::Tensor& out_idx,
                                                  const at::Tensor& src_idx,
                                                  const at::Tensor& dst_pos,
                                                  const c10::optional<at::Tensor>& src_merged) {
  TORCH_CHECK(x_in.dim() == 3, "x must be [G, N, C], got ", x_in.sizes());
  TORCH_CHECK(at::isFloatingType(x_in.scalar_type()), "x must be a float tensor");
  const int64_t g = x_in.size(0), n = x_in.size(1), c = x_in.size(2);
  if (size.defined()) {
    check_rows(size, "size", g, n);
    TORCH_CHECK(size.size(2) == 1 && at::isFloatingType(size.scalar_type()),
                "size must be a float [G, N, 1]");
  }
  Plan p = make_plan(g, n, out_idx, src_idx, dst_pos, src_merged);
  const at::Tensor x = last_dim_contiguous(x_in);
  at::Tensor out = at::empty({g, p.n_out, c}, x.options());
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out_s = at::empty({g, p.n_out, 1}, x.options().dtype(acc_type));
  at::Tensor s;  // undefined: ones
  if (size.defined()) {
    s = size.to(acc_type).reshape({g, n}).contiguous();
    // The fast path of vt.merge leaves this check (API.md: sizes are positive) to us.
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "vtome_size_check", [&] {
      const scalar_t* sp = s.data_ptr<scalar_t>();
      bool ok = true;
      for (int64_t t = 0; t < g * n; ++t) ok &= sp[t] > 0;  // NaN fails too
      TORCH_CHECK_VALUE(ok, "size must be positive everywhere, got min ", s.min().item<double>());
    });
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "vtome_merge", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const Rows<const scalar_t> xr = rows<const scalar_t>(x);
    const Rows<scalar_t> yr = rows<scalar_t>(out);
    const acc_t* sp = s.defined() ? s.data_ptr<acc_t>() : nullptr;
    acc_t* osp = out_s.data_ptr<acc_t>();
    const int64_t grain = row_grain(c);
    at::parallel_for(0, g * p.n_out, grain, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> acc(c);
      for (int64_t t = t0; t < t1; ++t) {
        const OutRow row = out_row(p, t);
        const acc_t sb = sp ? sp[row.gi * n + row.b] : acc_t(1);
        scalar_t* y = yr.row(row.gi, row.o);
        bool received;
        const acc_t tot = weighted_sum(p, row, xr, sp, sb, c, acc.data(), received, [](int64_t) {});
        osp[t] = tot;
        if (!received) {
          std::memcpy(y, xr.row(row.gi, row.b), sizeof(scalar_t) * c);
        } else {
          for (int64_t k = 0; k < c; ++k) y[k] = static_cast<scalar_t>(acc[k] / tot);
        }
      }
    });
  });
  return {out, size.defined() ? out_s.to(size.scalar_type()) : out_s.to(at::kFloat)};
}

namespace {

std::tuple<at::Tensor, at::Tensor> merge_cpu(const at::Tensor& x, const at::Tensor& size,
                                             const at::Tensor& out_idx, const at::Tensor& src_idx,
                                             const at::Tensor& dst_pos,
                                             const c10::optional<at::Tensor>& src_merged) {
  TORCH_CHECK(size.defined(), "size must be a tensor");
  return merge_cpu_impl(x, size, out_idx, src_idx, dst_pos, src_merged);
}

// Gradient of merge in x and size (y = Σ x_k s_k / Σ s_k over the row's members):
//   dx_k = gy s_k / T,  ds_k = <gy, x_k - y> / T + gs;  rows receiving nothing: dx = gy,
//   ds = gs; a discarded source gets zero.
std::tuple<at::Tensor, at::Tensor> merge_backward_cpu(
    const at::Tensor& grad_out_in, const c10::optional<at::Tensor>& grad_size,
    const at::Tensor& x_in, const at::Tensor& size, const at::Tensor& out_idx,
    const at::Tensor& src_idx, const at::Tensor& dst_pos,
    const c10::optional<at::Tensor>& src_merged) {
  const int64_t g = x_in.size(0), n = x_in.size(1), c = x_in.size(2);
  Plan p = make_plan(g, n, out_idx, src_idx, dst_pos, src_merged);
  check_rows(grad_out_in, "grad", g, p.n_out);
  TORCH_CHECK(grad_out_in.size(2) == c, "grad must have C = ", c);
  const auto acc_type = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x = last_dim_contiguous(x_in);
  const at::Tensor gy = last_dim_contiguous(grad_out_in.to(x.scalar_type()));
  at::Tensor s = size.to(acc_type).reshape({g, n}).contiguous();
  at::Tensor gs;
  if (grad_size.has_value() && grad_size->defined())
    gs = grad_size->to(acc_type).reshape({g, p.n_out}).contiguous();
  at::Tensor gx = at::empty({g, n, c}, x.options());
  at::Tensor gsz = at::empty({g, n}, s.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "vtome_merge_bwd", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const Rows<const scalar_t> xr = rows<const scalar_t>(x);
    const Rows<const scalar_t> gr = rows<const scalar_t>(gy);
    const Rows<scalar_t> dxr = rows<scalar_t>(gx);
    const acc_t* sp = s.data_ptr<acc_t>();
    const acc_t* gsp = gs.defined() ? gs.data_ptr<acc_t>() : nullptr;
    acc_t* dsp = gsz.data_ptr<acc_t>();
    const int64_t grain = row_grain(c);
    at::parallel_for(0, g * p.n_out, grain, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> y(c);
      for (int64_t t = t0; t < t1; ++t) {
        const OutRow row = out_row(p, t);
        const int64_t gi = row.gi, b = row.b;
        const acc_t sb = sp[gi * n + b], gso = gsp ? gsp[t] : acc_t(0);
        const scalar_t* g_o = gr.row(gi, row.o);
        bool received;
        const acc_t tot = weighted_sum(p, row, xr, sp, sb, c, y.data(), received,
                                       [&](int64_t src) {  // discarded: no gradient
                                         std::memset(dxr.row(gi, src), 0, sizeof(scalar_t) * c);
                                         dsp[gi * n + src] = 0;
                                       });
        if (!received) {
          std::memcpy(dxr.row(gi, b), g_o, sizeof(scalar_t) * c);
          dsp[gi * n + b] = gso;
          continue;
        }
        for (int64_t k = 0; k < c; ++k) y[k] /= tot;
        // The base token, then every merged source: the same formula with its own weight.
        auto member = [&](int64_t pos, acc_t wk) {
          const scalar_t* xk = xr.row(gi, pos);
          scalar_t* dx = dxr.row(gi, pos);
          acc_t dot = 0;
          for (int64_t k = 0; k < c; ++k) {
            const acc_t gk = static_cast<acc_t>(g_o[k]);
            dot += gk * (static_cast<acc_t>(xk[k]) - y[k]);
            dx[k] = static_cast<scalar_t>(gk * wk / tot);
          }
          dsp[gi * n + pos] = dot / tot + gso;
        };
        member(b, sb);
        for (const int64_t j : row) {
          const int64_t src = src_pos(p, gi, j);
          if (merges(p, gi, j)) member(src, sp[gi * n + src]);
        }
      }
    });
  });
  return {gx, gsz.reshape({g, n, 1}).to(size.scalar_type())};
}

// ---------------------------------------------------------------------------------------
// merge_source: merged rows are the element-wise max of their members (a discarded source
// contributes zeros, as the reference's multiplication by src_merged does)
// ---------------------------------------------------------------------------------------
template <typename T>
inline T vmax(T a, T b) {
  const float fa = static_cast<float>(a), fb = static_cast<float>(b);
  return (std::isnan(fb) || fb > fa) ? b : a;
}
template <>
inline double vmax(double a, double b) {
  return (std::isnan(b) || b > a) ? b : a;
}
template <>
inline bool vmax(bool a, bool b) {
  return a || b;
}

at::Tensor merge_source_cpu(const at::Tensor& src_in, const at::Tensor& out_idx,
                            const at::Tensor& src_idx, const at::Tensor& dst_pos,
                            const c10::optional<at::Tensor>& src_merged) {
  TORCH_CHECK(src_in.dim() == 3, "source must be [G, N, N0], got ", src_in.sizes());
  const int64_t g = src_in.size(0), n = src_in.size(1), n0 = src_in.size(2);
  Plan p = make_plan(g, n, out_idx, src_idx, dst_pos, src_merged);
  const at::Tensor source = last_dim_contiguous(src_in);
  at::Tensor out = at::empty({g, p.n_out, n0}, source.options());
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kBFloat16, at::kHalf, at::kBool, source.scalar_type(),
                                  "vtome_merge_source", [&] {
    const Rows<const scalar_t> sr = rows<const scalar_t>(source);
    const Rows<scalar_t> yr = rows<scalar_t>(out);
    const int64_t grain = row_grain(n0);
    at::parallel_for(0, g * p.n_out, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const OutRow row = out_row(p, t);
        scalar_t* y = yr.row(row.gi, row.o);
        std::memcpy(y, sr.row(row.gi, row.b), sizeof(scalar_t) * n0);
        for (const int64_t j : row) {
          if (merges(p, row.gi, j)) {
            const scalar_t* xs = sr.row(row.gi, src_pos(p, row.gi, j));
            for (int64_t k = 0; k < n0; ++k) y[k] = vmax<scalar_t>(y[k], xs[k]);
          } else {
            for (int64_t k = 0; k < n0; ++k) y[k] = vmax<scalar_t>(y[k], scalar_t(0));
          }
        }
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------
// unmerge: position out_idx[o] gets y[o], a source gets its destination's row
// ---------------------------------------------------------------------------------------
at::Tensor unmerge_cpu(const at::Tensor& y_in, const at::Tensor& out_idx, const at::Tensor& src_idx,
                       const at::Tensor& dst_pos, int64_t n) {
  TORCH_CHECK(y_in.dim() == 3, "y must be [G, N', C], got ", y_in.sizes());
  const int64_t g = y_in.size(0), c = y_in.size(2);
  Plan p = make_plan(g, n, out_idx, src_idx, dst_pos, c10::nullopt);
  check_rows(y_in, "y", g, p.n_out);
  const at::Tensor y = last_dim_contiguous(y_in);
  // from[g][pos]: the row of y that position pos copies (every position is covered once).
  std::vector<int64_t> from(size_t(g * n), -1);
  const int64_t* dst = dst_pos.data_ptr<int64_t>();
  for (int64_t gi = 0; gi < g; ++gi) {
    for (int64_t o = 0; o < p.n_out; ++o) from[gi * n + p.out_idx[gi * p.n_out + o]] = o;
    for (int64_t j = 0; j < p.r; ++j) from[gi * n + p.src_idx[gi * p.r + j]] = dst[gi * p.r + j];
  }
  for (int64_t t = 0; t < g * n; ++t)
    TORCH_CHECK(from[t] >= 0, "out_idx and src_idx must cover every position once");
  at::Tensor full = at::empty({g, n, c}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "vtome_unmerge", [&] {
    const Rows<const scalar_t> yr = rows<const scalar_t>(y);
    const Rows<scalar_t> fr = rows<scalar_t>(full);
    const int64_t grain = row_grain(c);
    at::parallel_for(0, g * n, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        std::memcpy(fr.row(t / n, t % n), yr.row(t / n, from[t]), sizeof(scalar_t) * c);
    });
  });
  return full;
}

// Gradient of unmerge: row o of y collects its own position and its sources' positions.
at::Tensor unmerge_backward_cpu(const at::Tensor& grad_in, const at::Tensor& out_idx,
                                const at::Tensor& src_idx, const at::Tensor& dst_pos) {
  TORCH_CHECK(grad_in.dim() == 3, "grad must be [G, N, C], got ", grad_in.sizes());
  const int64_t g = grad_in.size(0), n = grad_in.size(1), c = grad_in.size(2);
  Plan p = make_plan(g, n, out_idx, src_idx, dst_pos, c10::nullopt);
  const at::Tensor gf = last_dim_contiguous(grad_in);
  at::Tensor gy = at::empty({g, p.n_out, c}, gf.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gf.scalar_type(), "vtome_unmerge_bwd", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const Rows<const scalar_t> fr = rows<const scalar_t>(gf);
    const Rows<scalar_t> yr = rows<scalar_t>(gy);
    const int64_t grain = row_grain(c);
    at::parallel_for(0, g * p.n_out, grain, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> acc(c);
      for (int64_t t = t0; t < t1; ++t) {
        const OutRow row = out_row(p, t);
        const scalar_t* base = fr.row(row.gi, row.b);
        scalar_t* y = yr.row(row.gi, row.o);
        if (!row.receives()) {
          std::memcpy(y, base, sizeof(scalar_t) * c);
          continue;
        }
        for (int64_t k = 0; k < c; ++k) acc[k] = static_cast<acc_t>(base[k]);
        for (const int64_t j : row) {
          const scalar_t* xs = fr.row(row.gi, src_pos(p, row.gi, j));
          for (int64_t k = 0; k < c; ++k) acc[k] += static_cast<acc_t>(xs[k]);
        }
        for (int64_t k = 0; k < c; ++k) y[k] = static_cast<scalar_t>(acc[k]);
      }
    });
  });
  return gy;
}

}  // namespace

TORCH_LIBRARY_IMPL(vtome, CPU, m) {
  m.impl("merge", &merge_cpu);
  m.impl("merge_backward", &merge_backward_cpu);
  m.impl("merge_source", &merge_source_cpu);
  m.impl("unmerge", &unmerge_cpu);
  m.impl("unmerge_backward", &unmerge_backward_cpu);
}

}  // namespace vtome
