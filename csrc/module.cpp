// The Python module vtome_kernels._C. Importing it registers the CPU kernels of the vtome::
// ops (the TORCH_LIBRARY_IMPL(vtome, CPU, m) blocks of every csrc/*.cpp run when the
// library loads); the ops themselves (schemas, fakes, autograd) are defined in Python by
// vtome_kernels/ops.py, so they exist without this module. The module itself only says
// which score kernel this CPU got.
#include <pybind11/pybind11.h>

#include "scores/scores.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "vtome_kernels C++ CPU kernels (ops under torch.ops.vtome)";
  m.def("score_kernel", [] { return std::string(vtome::scores::best_kernel().name); },
        "Name of the score kernel this CPU runs: generic, avx2 or avx512.");
}
