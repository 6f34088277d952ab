// CUDA executor of the fused ConvTranspose1d + LoRA kernels in lora_convt_kernel.cuh.
//
// Only the kernel header and the CUDA runtime are included here (no torch headers: they
// cost minutes of nvcc time per file). Each __global__ runs one block of the shared body:
// a phase is executed by every thread once and followed by __syncthreads().
#include <cuda_runtime.h>

#include "lora_convt_cuda.h"

namespace rvclora {
namespace {

struct DeviceBlockExec {
  void* buf;
  __device__ Block3 block() const { return Block3{blockIdx.x, blockIdx.y, blockIdx.z}; }
  __device__ void* smem() const { return buf; }
  template <class F>
  __device__ void phase(F&& f) {
    f(static_cast<int>(threadIdx.x));
    __syncthreads();
  }
};

template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads) lora_convt_fwd_kernel(const FwdArgs<scalar_t, acc_t> p) {
  extern __shared__ unsigned char smem_raw[];
  DeviceBlockExec ex{smem_raw};
  lora_convt_fwd_block(p, ex);
}

template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads) lora_convt_bwd_input_kernel(const BwdInputArgs<scalar_t, acc_t> p) {
  extern __shared__ unsigned char smem_raw[];
  DeviceBlockExec ex{smem_raw};
  lora_convt_bwd_input_block(p, ex);
}

template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(kThreads) lora_convt_wgrad_kernel(const WgradArgs<scalar_t, acc_t> p) {
  extern __shared__ unsigned char smem_raw[];
  DeviceBlockExec ex{smem_raw};
  lora_convt_wgrad_block(p, ex);
}

template <class scalar_t, class acc_t>
__global__ void __launch_bounds__(256) lora_convt_mask_kernel(scalar_t* out, int64_t numel, const Dropout<acc_t> d) {
  dropout_mask_fill(out, numel, d, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x);
}

// Grid limits: y and z are 16-bit; report instead of launching a truncated grid.
bool grid_ok(int64_t x, int64_t y, int64_t z) {
  return x >= 1 && y >= 1 && z >= 1 && x < (int64_t(1) << 31) && y <= 65535 && z <= 65535;
}

template <class F>
cudaError_t dispatch_cuda(DType dt, const F& f) {
  switch (dt) {
    case DType::kFloat32:
      return f(float{}, float{});
    case DType::kFloat64:
      return f(double{}, double{});
    case DType::kFloat16:
      return f(__half{}, float{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{}, float{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t lora_convt_fwd_cuda(DType dt, const FwdDesc& d, cudaStream_t stream) {
  return dispatch_cuda(dt, [&](auto s0, auto a0) {
    using scalar_t = decltype(s0);
    using acc_t = decltype(a0);
    const int64_t smem = fwd_smem_bytes(d.s, sizeof(acc_t));
    const int64_t gx = d.s.q_tiles, gy = d.s.groups * d.s.o_tiles, gz = d.s.N;
    if (smem > kMaxSmemBytes || !grid_ok(gx, gy, gz)) return cudaErrorInvalidConfiguration;
    lora_convt_fwd_kernel<scalar_t, acc_t>
        <<<dim3(gx, gy, gz), kThreads, smem, stream>>>(fwd_args<scalar_t, acc_t>(d));
    return cudaGetLastError();
  });
}

cudaError_t lora_convt_bwd_input_cuda(DType dt, const BwdInputDesc& d, cudaStream_t stream) {
  return dispatch_cuda(dt, [&](auto s0, auto a0) {
    using scalar_t = decltype(s0);
    using acc_t = decltype(a0);
    const int64_t smem = bwd_input_smem_bytes(d.s, sizeof(acc_t));
    const int64_t gx = d.s.t_tiles, gy = d.s.groups * d.s.i_tiles, gz = d.s.N;
    if (smem > kMaxSmemBytes || !grid_ok(gx, gy, gz)) return cudaErrorInvalidConfiguration;
    lora_convt_bwd_input_kernel<scalar_t, acc_t>
        <<<dim3(gx, gy, gz), kThreads, smem, stream>>>(bwd_input_args<scalar_t, acc_t>(d));
    return cudaGetLastError();
  });
}

cudaError_t lora_convt_wgrad_cuda(DType dt, const WgradDesc& d, cudaStream_t stream) {
  return dispatch_cuda(dt, [&](auto s0, auto a0) {
    using scalar_t = decltype(s0);
    using acc_t = decltype(a0);
    const int64_t smem = wgrad_smem_bytes(sizeof(acc_t));
    const int64_t gx = d.c_tiles * d.o_tiles, gy = d.groups * d.K, gz = d.splits;
    if (smem > kMaxSmemBytes || !grid_ok(gx, gy, gz)) return cudaErrorInvalidConfiguration;
    lora_convt_wgrad_kernel<scalar_t, acc_t>
        <<<dim3(gx, gy, gz), kThreads, smem, stream>>>(wgrad_args<scalar_t, acc_t>(d));
    return cudaGetLastError();
  });
}

cudaError_t lora_convt_mask_cuda(DType dt, void* out, int64_t numel, double p, int64_t seed, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  return dispatch_cuda(dt, [&](auto s0, auto a0) {
    using scalar_t = decltype(s0);
    using acc_t = decltype(a0);
    const int64_t blocks = (numel + 255) / 256;
    if (!grid_ok(blocks, 1, 1)) return cudaErrorInvalidConfiguration;
    lora_convt_mask_kernel<scalar_t, acc_t>
        <<<dim3(blocks), 256, 0, stream>>>(static_cast<scalar_t*>(out), numel, dropout_params<acc_t>(p, seed));
    return cudaGetLastError();
  });
}

}  // namespace rvclora
