// Row max / argmax of exact float32 cosine scores, one kernel per instruction set.
//
// The score of A row i and B column j is acc = 0; acc = acc + a[i][k] * b[k][j] for
// k = 0..d-1 with a separate multiply and add (reference._dot), so every value is
// bit-identical to the reference's whatever the vector width or blocking: a lane only
// ever accumulates its own (i, j) pair in order k. Only a running maximum per row is kept.
#pragma once
#include <cstdint>

namespace vtome {
namespace scores {

struct Problem {
  const float* a;   // [na][d] normalised A rows, row-major
  const float* bt;  // normalised B packed in panels of tile_cols columns: column j, dim k
                    // at bt_index(j, k, d, tile_cols); columns that must never win
                    // (padding, a masked distillation column) hold NaN
  int64_t d;
  int64_t nbp;      // padded column count: a multiple of the kernel's tile_cols()
};

inline int64_t bt_index(int64_t j, int64_t k, int64_t d, int64_t tc) {
  return (j - j % tc) * d + k * tc + j % tc;
}

// One implementation: its name, its column tile (nbp must be a multiple of it) and the
// kernel writing best[i], arg[i] for rows [i0, i1): the largest score of the row over
// non-NaN columns (-inf if none) and the lowest column index reaching it (0 if none).
struct Kernel {
  const char* name;
  int64_t tile_cols;
  void (*row_max)(const Problem& p, int64_t i0, int64_t i1, float* best, int64_t* arg);
};

Kernel generic_kernel();
Kernel generic16_kernel();  // the AVX-512 tile shape on any CPU (for tests)
Kernel avx2_kernel();
Kernel avx512_kernel();

// The widest kernel this CPU runs (checked once). VTOME_ISA=generic|generic16|avx2|avx512
// picks one instead (falling back to generic if the CPU lacks it): for tests.
const Kernel& best_kernel();

}  // namespace scores
}  // namespace vtome
