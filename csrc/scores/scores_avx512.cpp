// AVX-512 (compiled with -mavx512f, no FMA): 16 lanes, 8 rows x 48 columns = 24 accumulators.
#include "scores_impl.h"

namespace vtome {
namespace scores {
#if defined(VTOME_X86) && defined(__AVX512F__)
Kernel avx512_kernel() { return {"avx512", 48, &row_max_impl<16, 8, 3>}; }
#else
Kernel avx512_kernel() { return {nullptr, 0, nullptr}; }
#endif
}  // namespace scores
}  // namespace vtome
