// CPU twin of the fused ConvTranspose1d + LoRA kernels, and the op schemas.
//
// The CPU executor runs the kernel bodies of lora_convt_kernel.cuh over every block of the
// grid (blocks in parallel: they share nothing) and, inside a block, every phase for
// tid = 0..kThreads-1 before the next phase starts — exactly the barrier semantics of
// __syncthreads(). Shared memory is a per-block buffer poisoned with NaN, so a phase that
// reads an entry no earlier phase wrote shows up as NaN in the tests.
#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "lora_convt_ops.h"

namespace rvclora {
namespace {

struct CpuBlockExec {
  Block3 blk;
  void* buf;
  Block3 block() const { return blk; }
  void* smem() const { return buf; }
  template <class F>
  void phase(F&& f) {
    for (int tid = 0; tid < kThreads; ++tid) f(tid);
  }
};

template <class Body>
void run_grid(int64_t gx, int64_t gy, int64_t gz, int64_t smem_bytes, const Body& body) {
  at::parallel_for(0, gx * gy * gz, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> buf(static_cast<size_t>(smem_bytes / sizeof(double) + 1));
    for (int64_t b = b0; b < b1; ++b) {
      std::memset(buf.data(), 0xFF, buf.size() * sizeof(double));  // all-ones bits: NaN in fp32 and fp64
      CpuBlockExec ex{Block3{b % gx, (b / gx) % gy, b / (gx * gy)}, buf.data()};
      body(ex);
    }
  });
}

template <class F>
void dispatch_cpu(DType dt, const F& f) {
  switch (dt) {
    case DType::kFloat32:
      f(float{}, float{});
      return;
    case DType::kFloat64:
      f(double{}, double{});
      return;
    default:
      TORCH_CHECK(false, "rvclora: the CPU twin runs float32 and float64 only (half precision needs the CUDA kernel)");
  }
}

struct CpuRunner {
  static constexpr bool kPoisonOutputs = true;
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };

  static void fwd(DType dt, const FwdDesc& d) {
    dispatch_cpu(dt, [&](auto s0, auto a0) {
      using scalar_t = decltype(s0);
      using acc_t = decltype(a0);
      const auto p = fwd_args<scalar_t, acc_t>(d);
      run_grid(d.s.q_tiles, d.s.groups * d.s.o_tiles, d.s.N, fwd_smem_bytes(d.s, sizeof(acc_t)),
               [&](CpuBlockExec& ex) { lora_convt_fwd_block(p, ex); });
    });
  }

  static void bwd_input(DType dt, const BwdInputDesc& d) {
    dispatch_cpu(dt, [&](auto s0, auto a0) {
      using scalar_t = decltype(s0);
      using acc_t = decltype(a0);
      const auto p = bwd_input_args<scalar_t, acc_t>(d);
      run_grid(d.s.t_tiles, d.s.groups * d.s.i_tiles, d.s.N, bwd_input_smem_bytes(d.s, sizeof(acc_t)),
               [&](CpuBlockExec& ex) { lora_convt_bwd_input_block(p, ex); });
    });
  }

  static void wgrad(DType dt, const WgradDesc& d) {
    dispatch_cpu(dt, [&](auto s0, auto a0) {
      using scalar_t = decltype(s0);
      using acc_t = decltype(a0);
      const auto p = wgrad_args<scalar_t, acc_t>(d);
      run_grid(d.c_tiles * d.o_tiles, d.groups * d.K, d.splits, wgrad_smem_bytes(sizeof(acc_t)),
               [&](CpuBlockExec& ex) { lora_convt_wgrad_block(p, ex); });
    });
  }

  static void mask(DType dt, void* out, int64_t numel, double p, int64_t seed) {
    dispatch_cpu(dt, [&](auto s0, auto a0) {
      using scalar_t = decltype(s0);
      using acc_t = decltype(a0);
      const auto d = dropout_params<acc_t>(p, seed);
      scalar_t* o = static_cast<scalar_t*>(out);
      at::parallel_for(0, numel, 4096, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) dropout_mask_fill(o, numel, d, i);
      });
    });
  }
};

}  // namespace

// FRAGMENT, not TORCH_LIBRARY: the Python side (Triton ops) may add its own rvclora:: ops.
TORCH_LIBRARY_FRAGMENT(rvclora, m) {
  m.def(
      "cuda_lora_conv_transpose1d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "float scaling, int stride, int padding, int output_padding, int dilation, int groups, float dropout_p, "
      "Tensor? seed) -> (Tensor, Tensor)");
  m.def(
      "cuda_lora_conv_transpose1d_bwd(Tensor grad_y, Tensor x, Tensor u, Tensor weight, Tensor lora_A, "
      "Tensor lora_B, float scaling, int stride, int padding, int output_padding, int dilation, int groups, "
      "float dropout_p, Tensor? seed, bool[5] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cuda_dropout_mask(Tensor like, Tensor seed, float dropout_p) -> Tensor");
}

TORCH_LIBRARY_IMPL(rvclora, CPU, m) {
  m.impl("cuda_lora_conv_transpose1d_fwd", &lora_convt_fwd<CpuRunner>);
  m.impl("cuda_lora_conv_transpose1d_bwd", &lora_convt_bwd<CpuRunner>);
  m.impl("cuda_dropout_mask", &lora_convt_dropout_mask<CpuRunner>);
}

}  // namespace rvclora

// An importable module for the ahead-of-time build (`import rvclora._C` registers the ops);
// the JIT build loads the same library with torch.ops.load_library instead.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
