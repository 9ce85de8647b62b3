// Baseline x86-64 (SSE2) / any CPU: 4 lanes, 4 rows x 8 columns in registers. Also the
// AVX-512 tile shape (16 lanes, 8 rows x 48 columns) compiled for the baseline, so its
// blocking and lane logic are tested on machines without AVX-512 (VTOME_ISA=generic16).
#include "scores_impl.h"

namespace vtome {
namespace scores {
Kernel generic_kernel() { return {"generic", 8, &row_max_impl<4, 4, 2>}; }
Kernel generic16_kernel() { return {"generic16", 48, &row_max_impl<16, 8, 3>}; }
}  // namespace scores
}  // namespace vtome
