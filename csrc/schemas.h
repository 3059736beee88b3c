// The declaration of every loss op's schema (schemas.cpp), for the namespaces that hold them:
// robustft_ext, and robustft_cuda_rules (cpu/cuda_rules_cpu.cpp).
#pragma once

#include <torch/library.h>

namespace robustft {

void define_loss_ops(torch::Library& m);

}  // namespace robustft
