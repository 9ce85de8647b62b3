// Baseline x86-64 (SSE2) / any CPU: 4 lanes, 4 rows x 8 columns in registers.
#include "scores_impl.h"

namespace vtome {
namespace scores {
Kernel generic_kernel() { return {"generic", 8, &row_max_impl<4, 4, 2>}; }
}  // namespace scores
}  // namespace vtome
