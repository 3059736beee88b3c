// The GEMM and workspace launchers of the CUDA backend (contrastive_kernels.h): the
// backward passes multiply each chunk of dlogits into the feature gradients with cuBLAS,
// which runs the products on tensor cores (wgmma on sm_90) with float accumulation and a
// float output, whatever the 16-bit input type.
//
// Precision follows torch's own matmuls: 16-bit operands accumulate in float
// (CUBLAS_COMPUTE_32F); float operands use TF32 only where torch.get_float32_matmul_precision()
// allows it ("high" / "medium"), else exact float; double stays double.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDABlas.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>

#include "contrastive_kernels.h"
#include "contrastive_ops.h"
#include "launcher_contract.h"
#include "cuda/tile_dispatch.h"

namespace robustft {
namespace {

cudaDataType_t cuda_type(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16:
      return CUDA_R_16BF;
    case at::kHalf:
      return CUDA_R_16F;
    case at::kFloat:
      return CUDA_R_32F;
    case at::kDouble:
      return CUDA_R_64F;
    default:
      TORCH_CHECK(false, "robustft_ext: no cuBLAS type for ", t);
  }
}

const char* cublas_message(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_NOT_INITIALIZED: return "not initialised";
    case CUBLAS_STATUS_ALLOC_FAILED: return "allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "invalid value";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "architecture mismatch";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "execution failed";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "not supported";
    default: return "error";
  }
}

}  // namespace

at::ScalarType workspace_dtype_cuda(at::ScalarType t) { return tensor_core_workspace_dtype(t); }

// Row-major out [r, c] = alpha op(A) op(B) + beta out is, in cuBLAS's column-major terms,
// out^T [c, r] = op(B)^T op(A)^T, where a row-major X [x0, x1] is the column-major X^T with
// leading dimension its row stride (x1, or more for a column slice).
void gemm_acc_cuda(const at::Tensor& A, bool transpose_a, const at::Tensor& B, bool transpose_b,
                   const at::Tensor& alpha, double beta, at::Tensor& out) {
  const GemmShape shape = check_gemm_acc(A, transpose_a, B, transpose_b, alpha, beta, out,
                                         c10::kCUDA);
  const int64_t r = shape.r, k = shape.k, c = shape.c;
  const auto acc = out.scalar_type();
  if (r == 0 || c == 0) return;
  if (k == 0) {  // empty product: out = beta out
    if (beta == 0.0) out.zero_();
    return;
  }
  TORCH_CHECK(r <= INT32_MAX && c <= INT32_MAX && k <= INT32_MAX && A.stride(0) <= INT32_MAX &&
                  B.stride(0) <= INT32_MAX,
              "robustft_ext: gemm_acc dimensions exceed cuBLAS's int range");
  const c10::cuda::CUDAGuard guard(A.device());
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  // alpha and beta are read on the device: no host synchronisation.
  const at::Tensor beta_t = at::full({}, beta, alpha.options());
  at::cuda::blas::PointerModeGuard mode(handle, CUBLAS_POINTER_MODE_DEVICE);
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  if (acc == at::kDouble) {
    compute = CUBLAS_COMPUTE_64F;
  } else if (A.scalar_type() == at::kFloat && cuda_tiles::float32_matmul_allows_tf32()) {
    compute = CUBLAS_COMPUTE_32F_FAST_TF32;
  }
  const auto opA = transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const auto opB = transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasStatus_t st = cublasGemmEx(
      handle, opB, opA, static_cast<int>(c), static_cast<int>(r), static_cast<int>(k),
      alpha.data_ptr(), B.data_ptr(), cuda_type(B.scalar_type()), static_cast<int>(B.stride(0)),
      A.data_ptr(), cuda_type(A.scalar_type()), static_cast<int>(A.stride(0)), beta_t.data_ptr(),
      out.data_ptr(), cuda_type(acc), static_cast<int>(c), compute, CUBLAS_GEMM_DEFAULT);
  TORCH_CHECK(st == CUBLAS_STATUS_SUCCESS, "robustft_ext: cublasGemmEx failed: ",
              cublas_message(st));
}

}  // namespace robustft
