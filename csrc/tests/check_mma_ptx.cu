// nvcc build of the kernels of cuda_emulation/mma_test_kernels.cuh (every wrapper of
// cuda/mma_ptx.cuh), for csrc/tests/check_ptx_sass.sh: taking each kernel's address
// instantiates it for the GPU. Not part of the extension (setup.py builds csrc/cuda/*.cu).
#include "cuda_emulation/mma_test_kernels.cuh"

namespace rft_mma_test {

// The kernels' addresses (an exported function, so that none is dropped as unused).
const void* const* all_kernels() {
  static const void* const kernels[] = {
      reinterpret_cast<const void*>(&ldmatrix_probe_kernel<1, false>),
      reinterpret_cast<const void*>(&ldmatrix_probe_kernel<2, false>),
      reinterpret_cast<const void*>(&ldmatrix_probe_kernel<4, false>),
      reinterpret_cast<const void*>(&ldmatrix_probe_kernel<2, true>),
      reinterpret_cast<const void*>(&ldmatrix_probe_kernel<4, true>),
      reinterpret_cast<const void*>(&mma16_probe_kernel<true>),
      reinterpret_cast<const void*>(&mma16_probe_kernel<false>),
      reinterpret_cast<const void*>(&mma_tf32_probe_kernel),
      reinterpret_cast<const void*>(&convert_kernel<true>),
      reinterpret_cast<const void*>(&convert_kernel<false>),
      reinterpret_cast<const void*>(&gemm_tile_kernel<true, false>),
      reinterpret_cast<const void*>(&gemm_tile_kernel<true, true>),
      reinterpret_cast<const void*>(&gemm_tile_kernel<false, false>),
      reinterpret_cast<const void*>(&gemm_tile_kernel<false, true>),
      reinterpret_cast<const void*>(&chain_kernel<true>),
      reinterpret_cast<const void*>(&chain_kernel<false>),
      reinterpret_cast<const void*>(&cp_async_probe_kernel),
      reinterpret_cast<const void*>(&dynamic_smem_kernel),
  };
  return kernels;
}

}  // namespace rft_mma_test
