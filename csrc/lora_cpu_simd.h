// Hand-vectorised thin LoRA passes of the `cpu` backend's Conv1d and ConvTranspose1d (float32), shared by
// csrc/lora_cpu_conv1d.cpp and lora_cpu_convt.cpp (the ops) and csrc/lora_cpu_simd.cpp (the kernels,
// compiled for AVX-512 and for AVX2+FMA and picked at run time; see that file).
//
// Why: at rank 8 the library calls (oneDNN's 8-channel convolution, MKL's 8-row GEMMs) run these
// passes at 35-70 GFLOP/s, far below the base convolution's rate, and each is a separate sweep
// over an activation. Here each pass is a register-blocked microkernel over time tiles that stay
// in cache: one sweep over x for u, and one sweep per tile over g that gives g_u, grad_B and
// grad_A while the tile of g, u, g_u and x is in L1/L2.
#pragma once

#include <cstdint>

namespace rvclora_cpu_simd {

// The geometry the kernels run: groups 1, stride 1, zero padding `padl` on the left (the right
// padding is implied by Tout), no dropout. Tensors are contiguous: x (N, Cin, T), u (N, r, Tout),
// g (N, Cout, Tout), A (r, Cin·K) with (channel, tap) row-major, B (Cout, r).
struct Dims {
  int64_t N, Cin, T, Cout, K, r, padl, dil, Tout;
};

// 2 = AVX-512 (F, BW, DQ, VL), 1 = AVX2 + FMA, 0 = neither (the kernels are not used).
int isa();
const char* isa_name();

// u = conv1d(x, A): all of u.
void conv1d_u(const float* x, const float* A, float* u, const Dims& d);

// The backward's thin passes: gA (r, Cin·K) = Σ_t g_u ⊗ x_tap with g_u = s·Bᵀg, and
// gB (Cout, r) = s·Σ_t g uᵀ. Either output may be null (not needed). Written, not accumulated. When gu is not
// null, g_u itself (N, r, Tout) is written there too (for conv1d_grad_x).
void conv1d_bwd(const float* g, const float* x, const float* u, const float* B, float s, float* gA, float* gB,
                float* gu, const Dims& d);

// gx (N, Cin, T) += conv1dᵀ(gu, A): the LoRA term of the input gradient when the weight is not merged.
void conv1d_grad_x(const float* gu, const float* A, float* gx, const Dims& d);

// The direct plan of the Conv1d op (the convolution itself by these kernels, no convolution library):
// y = conv1d(x, Wm) + bias and u = conv1d(x, A) in one sweep over x (Wm (Cout, Cin·K), bias (Cout) or null);
// and gx = conv1dᵀ(g, Wm), all of gx (written, not accumulated).
void conv1d_direct_fwd(const float* x, const float* Wm, const float* bias, const float* A, float* y, float* u,
                       const Dims& d);
void conv1d_direct_gx(const float* g, const float* Wm, float* gx, const Dims& d);

// ConvTranspose1d (groups 1, no dropout): x (N, Cin, T), g (N, Cout, L), u and g_u (N, r, T), A (r, Cin),
// B (r, Cout·K) with (channel, tap) row-major. u = A·x is conv1d_u with one tap.
struct TDims {
  int64_t N, Cin, T, Cout, K, r, stride, pad, dil, L;
};

// gA (r, Cin) = Σ_t g_u ⊗ x with g_u[j, t] = s·Σ_{o,k} B[j, o·K + k]·g[o, t·stride + k·dil − pad], and
// gB (r, Cout·K) = s·Σ_t u[j, t]·g[o, t·stride + k·dil − pad]. Either may be null; gu (optional) gets g_u.
// g is split by phase (t mod stride) first, so every (channel, tap) is a shifted row, as in Conv1d.
void convt_bwd(const float* g, const float* x, const float* u, const float* B, float s, float* gA, float* gB,
               float* gu, const TDims& d);

}  // namespace rvclora_cpu_simd
