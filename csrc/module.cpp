// The Python module vtome_kernels._C. Importing it registers the vtome:: ops of every
// csrc/*.cpp (their TORCH_LIBRARY_FRAGMENT blocks run when the library loads); the module
// itself only says which score kernel this CPU got.
#include <pybind11/pybind11.h>

#include "scores/scores.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "vtome_kernels C++ CPU kernels (ops under torch.ops.vtome)";
  m.def("score_kernel", [] { return std::string(vtome::scores::best_kernel().name); },
        "Name of the score kernel this CPU runs: generic, avx2 or avx512.");
}
