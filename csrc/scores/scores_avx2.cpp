// AVX2 (compiled with -mavx2, no FMA): 8 lanes, 6 rows x 16 columns = 12 accumulators.
#include "scores_impl.h"

namespace vtome {
namespace scores {
#if defined(VTOME_X86) && defined(__AVX2__)
Kernel avx2_kernel() { return {"avx2", 16, &row_max_impl<8, 6, 2>}; }
#else
Kernel avx2_kernel() { return {nullptr, 0, nullptr}; }
#endif
}  // namespace scores
}  // namespace vtome
