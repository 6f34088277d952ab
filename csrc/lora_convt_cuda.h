// Launchers of the fused ConvTranspose1d + LoRA kernels (lora_convt_cuda.cu). Plain C++ types
// only, so the .cu compiles without torch headers; each returns the launch error.
#pragma once

#include <cuda_runtime_api.h>

#include "lora_convt_kernel.cuh"

namespace rvclora {

// Largest dynamic shared memory a launch may request without an opt-in: 48 KiB on every arch.
constexpr int64_t kMaxSmemBytes = 48 * 1024;

cudaError_t lora_convt_fwd_cuda(DType dt, const FwdDesc& d, cudaStream_t stream);
cudaError_t lora_convt_bwd_input_cuda(DType dt, const BwdInputDesc& d, cudaStream_t stream);
cudaError_t lora_convt_wgrad_cuda(DType dt, const WgradDesc& d, cudaStream_t stream);
cudaError_t lora_convt_mask_cuda(DType dt, void* out, int64_t numel, double p, int64_t seed, cudaStream_t stream);

}  // namespace rvclora
