// CUDA registrations of the fused ConvTranspose1d + LoRA ops: the torch glue of
// lora_convt_ops.h with a runner that calls the launchers of lora_convt_cuda.cu on the
// current stream and turns a launch error into a c10::Error. Built only when torch has CUDA.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "lora_convt_cuda.h"
#include "lora_convt_ops.h"

namespace rvclora {
namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err != cudaErrorInvalidConfiguration, "rvclora: ", what,
              ": shape too large for the fused kernel (grid dimension or shared memory over the limit)");
  C10_CUDA_CHECK(err);
}

struct CudaRunner {
  static constexpr bool kPoisonOutputs = false;
  struct Guard {
    explicit Guard(const at::Tensor& t) : guard(t.device()) {}
    c10::cuda::CUDAGuard guard;
  };

  static void fwd(DType dt, const FwdDesc& d) {
    check_launch(lora_convt_fwd_cuda(dt, d, c10::cuda::getCurrentCUDAStream().stream()),
                 "cuda_lora_conv_transpose1d_fwd");
  }
  static void bwd_input(DType dt, const BwdInputDesc& d) {
    check_launch(lora_convt_bwd_input_cuda(dt, d, c10::cuda::getCurrentCUDAStream().stream()),
                 "cuda_lora_conv_transpose1d_bwd (input)");
  }
  static void wgrad(DType dt, const WgradDesc& d) {
    check_launch(lora_convt_wgrad_cuda(dt, d, c10::cuda::getCurrentCUDAStream().stream()),
                 "cuda_lora_conv_transpose1d_bwd (weights)");
  }
  static void mask(DType dt, void* out, int64_t numel, double p, int64_t seed) {
    check_launch(lora_convt_mask_cuda(dt, out, numel, p, seed, c10::cuda::getCurrentCUDAStream().stream()),
                 "cuda_dropout_mask");
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(rvclora, CUDA, m) {
  m.impl("cuda_lora_conv_transpose1d_fwd", &lora_convt_fwd<CudaRunner>);
  m.impl("cuda_lora_conv_transpose1d_bwd", &lora_convt_bwd<CudaRunner>);
  m.impl("cuda_dropout_mask", &lora_convt_dropout_mask<CudaRunner>);
}

}  // namespace rvclora
