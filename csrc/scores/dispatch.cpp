// Run-time choice of the score kernel (baseline code: safe on every CPU).
#include <cstdlib>
#include <cstring>

#include "scores.h"

namespace vtome {
namespace scores {

static Kernel choose() {
  const char* cap = std::getenv("VTOME_ISA");
  const bool any = cap == nullptr || *cap == '\0';
  if (!any && std::strcmp(cap, "generic16") == 0) return generic16_kernel();
  if (!any && std::strcmp(cap, "generic") == 0) return generic_kernel();
#if defined(VTOME_X86)
  __builtin_cpu_init();
  if ((any || std::strcmp(cap, "avx512") == 0) && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && avx512_kernel().row_max != nullptr)
    return avx512_kernel();
  if ((any || std::strcmp(cap, "avx2") == 0) &&
      __builtin_cpu_supports("avx2") && avx2_kernel().row_max != nullptr)
    return avx2_kernel();
#endif
  return generic_kernel();
}

const Kernel& best_kernel() {
  static const Kernel k = choose();
  return k;
}

}  // namespace scores
}  // namespace vtome
