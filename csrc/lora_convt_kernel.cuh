// Fused ConvTranspose1d + exact LoRA: the kernel bodies, written once.
//
//   y = convT(concat[x, s·A·D(x)], concat[W, B]) + b          (docs/maths.md, single-pass form)
//
//   x: (N, Cin, T)   W: (Cin, Cout/g, K)   A: (r, Cin/g)   B: (r, Cout/g·K)   y: (N, Cout, L)
//   L = (T-1)·S − 2P + D·(K−1) + OP + 1,   output l = t'·S − P + t·D for input t', tap t.
//
// Everything here is plain C++ that nvcc compiles as __host__ __device__ code and g++ as host
// code. A kernel is a sequence of *phases* separated by block barriers; `Exec` runs a phase:
//   on the GPU (lora_convt_cuda.cu): every thread of the block calls it once, then __syncthreads();
//   on the CPU twin (lora_convt_cpu.cpp): a loop calls it for tid = 0..kThreads-1, in order.
// Registers live inside one phase; whatever crosses a barrier goes through `smem`, a per-block
// buffer. Because the two executors run the very same phase functions over the same block and
// thread indices, the CPU tests of the twin prove the GPU kernel's indexing.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define RVC_HD __host__ __device__ __forceinline__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#else
#define RVC_HD inline
#endif

namespace rvclora {

// One block shape for every kernel: 4 warps. Tiles below are sized for it.
constexpr int kThreads = 128;

// Forward: a block owns TO output channels × TQ polyphase positions q (all S phases);
// each thread a kFwdRO × kFwdRQ register tile. Thread (row, col) = (tid / 16, tid % 16).
constexpr int kCols = 16;
constexpr int kRows = kThreads / kCols;  // 8
constexpr int kFwdRO = 4;
constexpr int kFwdRQ = 4;
constexpr int kFwdTO = kRows * kFwdRO;  // 32 output channels
constexpr int kFwdTQ = kCols * kFwdRQ;  // 64 positions per phase

// Input gradient: a block owns TI input channels × TT input positions.
constexpr int kBwdRI = 4;
constexpr int kBwdRT = 4;
constexpr int kBwdTI = kRows * kBwdRI;  // 32
constexpr int kBwdTT = kCols * kBwdRT;  // 64

// Weight gradients: a block owns a TC × TO tile of one tap; 8 reduction lanes × 4 × 4 threads.
constexpr int kRedLanes = 8;
constexpr int kWgRC = 4;
constexpr int kWgRO = 4;
constexpr int kWgTC = 4 * kWgRC;  // 16 source channels
constexpr int kWgTO = 4 * kWgRO;  // 16 output channels
// Split the (n, t') reduction until the grid has about this many blocks (4 per SM on an H100),
// but never into slices shorter than kMinSlice positions. Deterministic: partial sums go to a
// workspace and are added in a fixed order afterwards, no atomics.
constexpr int64_t kTargetBlocks = 528;
constexpr int64_t kMinSlice = 64;

struct Block3 {
  int64_t x, y, z;
};

// ------------------------------------------------------------------ scalar conversion

template <class acc_t, class T>
RVC_HD acc_t to_acc(T v) {
  return static_cast<acc_t>(v);
}
template <class T, class acc_t>
RVC_HD T from_acc(acc_t v) {
  return static_cast<T>(v);
}
#if defined(__CUDACC__)
template <>
RVC_HD float to_acc<float, __half>(__half v) {
  return __half2float(v);
}
template <>
RVC_HD float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
RVC_HD __half from_acc<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
RVC_HD __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}
#endif

// ------------------------------------------------------------------ dropout mask
//
// D(x)[idx] = x[idx] · (bits24(seed, idx) >= threshold ? 1/(1-p) : 0), idx = the element's
// offset in a contiguous (N, Cin, T) x. A counter-based hash (splitmix64 finaliser): the mask
// is a pure function of (seed, idx), so backward regenerates it instead of storing it.

RVC_HD uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

template <class acc_t>
struct Dropout {
  uint64_t seed;       // already mixed once on the host (dropout_params), so nearby seeds decorrelate
  uint32_t threshold;  // round(p · 2^24): an element is kept when its 24 random bits are >= this
  acc_t scale;         // 1 / (1 - p)
  int active;          // 0: D is the identity
};

template <class acc_t>
RVC_HD acc_t dropout_factor(const Dropout<acc_t>& d, int64_t idx) {
  if (!d.active) return acc_t(1);
  const uint64_t z = splitmix64(d.seed + 0x9E3779B97F4A7C15ull * (static_cast<uint64_t>(idx) + 1ull));
  return static_cast<uint32_t>(z >> 40) >= d.threshold ? d.scale : acc_t(0);
}

template <class acc_t>
inline Dropout<acc_t> dropout_params(double p, int64_t seed) {
  Dropout<acc_t> d;
  d.active = p > 0.0 ? 1 : 0;
  d.seed = splitmix64(static_cast<uint64_t>(seed));
  double thr = p * 16777216.0 + 0.5;
  d.threshold = static_cast<uint32_t>(thr > 16777216.0 ? 16777216.0 : thr);
  d.scale = static_cast<acc_t>(p > 0.0 ? 1.0 / (1.0 - p) : 1.0);
  return d;
}

// ------------------------------------------------------------------ geometry

struct ConvTShape {
  int64_t N, Cin, Cout, T, L, K, r, groups;
  int64_t S, P, D;     // stride, padding, dilation (output_padding only lengthens L)
  int64_t Cig, Cog, rg;  // per group: input channels, output channels, rank
  // Polyphase: output l + P = q·S + φ, φ ∈ [0, S). Tap t feeds phase φ iff t·D ≡ φ (mod S),
  // from input t' = q − m with m = (t·D − φ)/S ∈ [0, M]. So a q-tile of TQ positions reads a
  // span of TQ + M inputs starting at q0 − M.
  int64_t M, qmin, q_tiles, o_tiles;
  int64_t i_tiles, t_tiles;  // input-gradient grid
};

inline ConvTShape make_shape(int64_t N, int64_t Cin, int64_t T, int64_t Cog, int64_t K, int64_t r, int64_t S,
                             int64_t P, int64_t OP, int64_t D, int64_t groups) {
  ConvTShape s;
  s.N = N;
  s.Cin = Cin;
  s.T = T;
  s.K = K;
  s.r = r;
  s.groups = groups;
  s.S = S;
  s.P = P;
  s.D = D;
  s.Cig = Cin / groups;
  s.Cog = Cog;
  s.Cout = Cog * groups;
  s.rg = r / groups;
  s.L = (T - 1) * S - 2 * P + D * (K - 1) + OP + 1;
  s.M = (K - 1) * D / S;
  s.qmin = P / S;
  const int64_t qmax = (s.L - 1 + P) / S;
  s.q_tiles = (qmax - s.qmin + kFwdTQ) / kFwdTQ;
  s.o_tiles = (Cog + kFwdTO - 1) / kFwdTO;
  s.i_tiles = (s.Cig + kBwdTI - 1) / kBwdTI;
  s.t_tiles = (T + kBwdTT - 1) / kBwdTT;
  return s;
}

inline int64_t fwd_smem_bytes(const ConvTShape& s, int64_t acc_size) {
  return s.rg * (kFwdTQ + s.M) * acc_size;
}
inline int64_t bwd_input_smem_bytes(const ConvTShape& s, int64_t acc_size) {
  return s.rg * kBwdTT * acc_size;
}
inline int64_t wgrad_smem_bytes(int64_t acc_size) {
  return int64_t(kThreads) * kWgRC * kWgRO * acc_size;
}

// ================================================================== forward
//
// Grid (q_tiles, groups·o_tiles, N). Phase 1 (prologue): u = A·D(x) for the block's input
// span into smem (rg × (TQ+M), zero outside [0, T)). Phase 2: for each phase φ, the
// transposed convolution over Cin/g + rg channels, the last rg read from smem against s·B;
// stores y, and the block's share of u (unscaled, for grad_B) when u_out is set.

template <class scalar_t, class acc_t>
struct FwdArgs {
  const scalar_t* x;
  const scalar_t* w;
  const scalar_t* bias;  // may be null
  const scalar_t* a;
  const scalar_t* b;
  scalar_t* y;
  acc_t* u_out;  // (N, r, T) or null
  acc_t scaling;
  ConvTShape s;
  Dropout<acc_t> drop;
};

template <class scalar_t, class acc_t>
RVC_HD acc_t lora_u_at(const FwdArgs<scalar_t, acc_t>& p, int64_t n, int64_t grp, int64_t j, int64_t tp) {
  const ConvTShape& s = p.s;
  acc_t acc = 0;
  const scalar_t* arow = p.a + (grp * s.rg + j) * s.Cig;
  for (int64_t i = 0; i < s.Cig; ++i) {
    const int64_t xi = (n * s.Cin + grp * s.Cig + i) * s.T + tp;
    acc += to_acc<acc_t>(arow[i]) * to_acc<acc_t>(p.x[xi]) * dropout_factor(p.drop, xi);
  }
  return acc;
}

template <class scalar_t, class acc_t>
RVC_HD void fwd_prologue(const FwdArgs<scalar_t, acc_t>& p, Block3 blk, int tid, acc_t* smem) {
  const ConvTShape& s = p.s;
  const int64_t grp = blk.y / s.o_tiles, n = blk.z;
  const int64_t span = kFwdTQ + s.M;
  const int64_t tp0 = s.qmin + blk.x * kFwdTQ - s.M;
  for (int64_t e = tid; e < s.rg * span; e += kThreads) {
    const int64_t j = e / span, tp = tp0 + e % span;
    smem[e] = (tp >= 0 && tp < s.T) ? lora_u_at(p, n, grp, j, tp) : acc_t(0);
  }
}

template <class scalar_t, class acc_t>
RVC_HD void fwd_main(const FwdArgs<scalar_t, acc_t>& p, Block3 blk, int tid, const acc_t* smem) {
  const ConvTShape& s = p.s;
  const int64_t grp = blk.y / s.o_tiles, ot = blk.y % s.o_tiles, n = blk.z;
  const int64_t span = kFwdTQ + s.M;
  const int64_t q0 = s.qmin + blk.x * kFwdTQ;
  const int64_t tp0 = q0 - s.M;
  const int row = tid / kCols, col = tid % kCols;
  const int64_t o0 = ot * kFwdTO + row * kFwdRO;  // first output channel (within the group)

  for (int64_t phi = 0; phi < s.S; ++phi) {
    acc_t acc[kFwdRO][kFwdRQ];
    for (int a = 0; a < kFwdRO; ++a)
      for (int k = 0; k < kFwdRQ; ++k) acc[a][k] = 0;
    for (int64_t t = 0; t < s.K; ++t) {
      const int64_t tdp = t * s.D - phi;
      if (tdp < 0 || tdp % s.S != 0) continue;  // tap t does not feed phase φ (uniform per block)
      const int64_t m = tdp / s.S;
      // base channels: x · W
      for (int64_t i = 0; i < s.Cig; ++i) {
        const int64_t ci = grp * s.Cig + i;
        const scalar_t* xrow = p.x + (n * s.Cin + ci) * s.T;
        acc_t xv[kFwdRQ], wv[kFwdRO];
        for (int k = 0; k < kFwdRQ; ++k) {
          const int64_t tp = q0 + col + k * kCols - m;
          xv[k] = (tp >= 0 && tp < s.T) ? to_acc<acc_t>(xrow[tp]) : acc_t(0);
        }
        for (int a = 0; a < kFwdRO; ++a) {
          const int64_t o = o0 + a;
          wv[a] = o < s.Cog ? to_acc<acc_t>(p.w[(ci * s.Cog + o) * s.K + t]) : acc_t(0);
        }
        for (int a = 0; a < kFwdRO; ++a)
          for (int k = 0; k < kFwdRQ; ++k) acc[a][k] += wv[a] * xv[k];
      }
      // LoRA channels: u (smem) · s·B
      for (int64_t j = 0; j < s.rg; ++j) {
        const acc_t* urow = smem + j * span;
        const scalar_t* brow = p.b + (grp * s.rg + j) * s.Cog * s.K;
        acc_t uv[kFwdRQ], bv[kFwdRO];
        for (int k = 0; k < kFwdRQ; ++k) uv[k] = urow[col + k * kCols + s.M - m];
        for (int a = 0; a < kFwdRO; ++a) {
          const int64_t o = o0 + a;
          bv[a] = o < s.Cog ? p.scaling * to_acc<acc_t>(brow[o * s.K + t]) : acc_t(0);
        }
        for (int a = 0; a < kFwdRO; ++a)
          for (int k = 0; k < kFwdRQ; ++k) acc[a][k] += bv[a] * uv[k];
      }
    }
    for (int a = 0; a < kFwdRO; ++a) {
      const int64_t o = o0 + a;
      if (o >= s.Cog) continue;
      const int64_t oc = grp * s.Cog + o;
      const acc_t bias = p.bias ? to_acc<acc_t>(p.bias[oc]) : acc_t(0);
      for (int k = 0; k < kFwdRQ; ++k) {
        const int64_t l = (q0 + col + k * kCols) * s.S + phi - s.P;
        if (l >= 0 && l < s.L) p.y[(n * s.Cout + oc) * s.L + l] = from_acc<scalar_t>(acc[a][k] + bias);
      }
    }
  }

  // u for backward: the o-tile-0 blocks of a q-tile own inputs [tp0, tp0 + TQ) (a partition
  // of [0, T) once the first and last tiles stretch to the ends). Inside the span the value
  // is in smem; the stretched ends (inputs that reach no output) are computed here.
  if (p.u_out && ot == 0) {
    const int64_t lo = (blk.x == 0 || tp0 < 0) ? 0 : tp0;
    const int64_t hi = blk.x == s.q_tiles - 1 ? s.T : (tp0 + kFwdTQ < s.T ? tp0 + kFwdTQ : s.T);
    if (hi > lo) {
      for (int64_t e = tid; e < s.rg * (hi - lo); e += kThreads) {
        const int64_t j = e / (hi - lo), tp = lo + e % (hi - lo);
        const acc_t v = (tp >= tp0 && tp < tp0 + span) ? smem[j * span + (tp - tp0)] : lora_u_at(p, n, grp, j, tp);
        p.u_out[(n * s.r + grp * s.rg + j) * s.T + tp] = v;
      }
    }
  }
}

template <class Exec, class scalar_t, class acc_t>
RVC_HD void lora_convt_fwd_block(const FwdArgs<scalar_t, acc_t>& p, Exec& ex) {
  acc_t* smem = static_cast<acc_t*>(ex.smem());
  const Block3 blk = ex.block();
  ex.phase([&](int tid) { fwd_prologue(p, blk, tid, smem); });
  ex.phase([&](int tid) { fwd_main(p, blk, tid, smem); });
}

// ================================================================== input gradient
//
//   g_u[n, j, t'] = s · Σ_{o, t} g[n, o, t'S − P + tD] · B[j, o, t]
//   grad_x[n, i, t'] = Σ_{o, t} g[n, o, t'S − P + tD] · W[i, o, t] + mask[n, i, t'] · Σ_j A[j, i] · g_u[n, j, t']
//
// One strided-convolution pass. Grid (t_tiles, groups·i_tiles, N). Phase 1: the block's g_u
// tile (rg × TT) into smem; i-tile-0 blocks also write it to gu_out (for grad_A). Phase 2
// (skipped when grad_x is not wanted): the strided convolution plus the LoRA term.

template <class scalar_t, class acc_t>
struct BwdInputArgs {
  const scalar_t* g;  // (N, Cout, L)
  const scalar_t* w;
  const scalar_t* a;
  const scalar_t* b;
  scalar_t* gx;   // (N, Cin, T) or null
  acc_t* gu_out;  // (N, r, T) or null
  acc_t scaling;
  ConvTShape s;
  Dropout<acc_t> drop;
};

template <class scalar_t, class acc_t>
RVC_HD void bwd_input_prologue(const BwdInputArgs<scalar_t, acc_t>& p, Block3 blk, int tid, acc_t* smem) {
  const ConvTShape& s = p.s;
  const int64_t grp = blk.y / s.i_tiles, it = blk.y % s.i_tiles, n = blk.z;
  const int64_t t0 = blk.x * kBwdTT;
  for (int64_t e = tid; e < s.rg * kBwdTT; e += kThreads) {
    const int64_t j = e / kBwdTT, tp = t0 + e % kBwdTT;
    acc_t acc = 0;
    if (tp < s.T) {
      const scalar_t* brow = p.b + (grp * s.rg + j) * s.Cog * s.K;
      for (int64_t t = 0; t < s.K; ++t) {
        const int64_t l = tp * s.S - s.P + t * s.D;
        if (l < 0 || l >= s.L) continue;
        for (int64_t o = 0; o < s.Cog; ++o)
          acc += to_acc<acc_t>(p.g[(n * s.Cout + grp * s.Cog + o) * s.L + l]) * to_acc<acc_t>(brow[o * s.K + t]);
      }
      acc *= p.scaling;
      if (p.gu_out && it == 0) p.gu_out[(n * s.r + grp * s.rg + j) * s.T + tp] = acc;
    }
    smem[e] = acc;
  }
}

template <class scalar_t, class acc_t>
RVC_HD void bwd_input_main(const BwdInputArgs<scalar_t, acc_t>& p, Block3 blk, int tid, const acc_t* smem) {
  if (!p.gx) return;
  const ConvTShape& s = p.s;
  const int64_t grp = blk.y / s.i_tiles, it = blk.y % s.i_tiles, n = blk.z;
  const int row = tid / kCols, col = tid % kCols;
  const int64_t i0 = it * kBwdTI + row * kBwdRI;  // first input channel (within the group)
  const int64_t t0 = blk.x * kBwdTT + col;       // positions t0 + k·16

  acc_t acc[kBwdRI][kBwdRT], accl[kBwdRI][kBwdRT];
  for (int a = 0; a < kBwdRI; ++a)
    for (int k = 0; k < kBwdRT; ++k) acc[a][k] = accl[a][k] = 0;
  for (int64_t t = 0; t < s.K; ++t) {
    int64_t lk[kBwdRT];
    for (int k = 0; k < kBwdRT; ++k) {
      const int64_t tp = t0 + k * kCols;
      const int64_t l = tp * s.S - s.P + t * s.D;
      lk[k] = (tp < s.T && l >= 0 && l < s.L) ? l : -1;
    }
    for (int64_t o = 0; o < s.Cog; ++o) {
      const scalar_t* grow = p.g + (n * s.Cout + grp * s.Cog + o) * s.L;
      acc_t gv[kBwdRT], wv[kBwdRI];
      for (int k = 0; k < kBwdRT; ++k) gv[k] = lk[k] >= 0 ? to_acc<acc_t>(grow[lk[k]]) : acc_t(0);
      for (int a = 0; a < kBwdRI; ++a) {
        const int64_t i = i0 + a;
        wv[a] = i < s.Cig ? to_acc<acc_t>(p.w[((grp * s.Cig + i) * s.Cog + o) * s.K + t]) : acc_t(0);
      }
      for (int a = 0; a < kBwdRI; ++a)
        for (int k = 0; k < kBwdRT; ++k) acc[a][k] += wv[a] * gv[k];
    }
  }
  for (int64_t j = 0; j < s.rg; ++j) {
    acc_t guv[kBwdRT], av[kBwdRI];
    for (int k = 0; k < kBwdRT; ++k) guv[k] = smem[j * kBwdTT + col + k * kCols];
    for (int a = 0; a < kBwdRI; ++a) {
      const int64_t i = i0 + a;
      av[a] = i < s.Cig ? to_acc<acc_t>(p.a[(grp * s.rg + j) * s.Cig + i]) : acc_t(0);
    }
    for (int a = 0; a < kBwdRI; ++a)
      for (int k = 0; k < kBwdRT; ++k) accl[a][k] += av[a] * guv[k];
  }
  for (int a = 0; a < kBwdRI; ++a) {
    const int64_t i = i0 + a;
    if (i >= s.Cig) continue;
    for (int k = 0; k < kBwdRT; ++k) {
      const int64_t tp = t0 + k * kCols;
      if (tp >= s.T) continue;
      const int64_t xi = (n * s.Cin + grp * s.Cig + i) * s.T + tp;
      p.gx[xi] = from_acc<scalar_t>(acc[a][k] + dropout_factor(p.drop, xi) * accl[a][k]);
    }
  }
}

template <class Exec, class scalar_t, class acc_t>
RVC_HD void lora_convt_bwd_input_block(const BwdInputArgs<scalar_t, acc_t>& p, Exec& ex) {
  acc_t* smem = static_cast<acc_t*>(ex.smem());
  const Block3 blk = ex.block();
  ex.phase([&](int tid) { bwd_input_prologue(p, blk, tid, smem); });
  ex.phase([&](int tid) { bwd_input_main(p, blk, tid, smem); });
}

// ================================================================== weight gradients
//
//   out[split, grp, c, o, t] = Σ_{(n, t') in split} src_c[n, t'] · q[n, grp·Cq + o, t'·S − P + t·D]
//
// with src = concat[p1 (c < C1), alpha2 · p2 (C1 ≤ c < C1 + C2)] per group. Instances:
//   grad_W, grad_B:  p1 = x, p2 = u, alpha2 = s, q = grad_y               (C1 = Cin/g, C2 = rg)
//   grad_A:          p1 = g_u, q = x with its dropout mask, S = 1, P = 0, D = 1, K = 1
// Grid (c_tiles·o_tiles, groups·K, splits). Phase 1: each thread reduces a kWgRC × kWgRO tile
// over its lane's share of the slice (lanes read consecutive t': coalesced) into smem.
// Phase 2: the 8 lanes are summed in a fixed order and the tile is written to the workspace.

template <class scalar_t, class acc_t>
struct WgradArgs {
  const scalar_t* p1;  // (N, groups·C1, Tp) — channel stride C1tot
  const acc_t* p1_acc;  // instead of p1 when the source is an fp32 intermediate (g_u)
  const acc_t* p2;     // (N, groups·C2, Tp) or null
  const scalar_t* q;   // (N, groups·Cq, Lq)
  acc_t alpha2;
  int64_t N, Tp, C1, C2, C1tot, C2tot, Cq, Cqtot, Lq, groups;
  int64_t S, P, D, K;
  int64_t c_tiles, o_tiles, splits, slice;
  Dropout<acc_t> q_drop;  // mask on q (grad_A: D(x)); index = offset in q
  acc_t* out;             // (splits, groups, C1 + C2, Cq, K)
};

template <class scalar_t, class acc_t>
RVC_HD acc_t wgrad_src(const WgradArgs<scalar_t, acc_t>& p, int64_t n, int64_t grp, int64_t c, int64_t tp) {
  if (c < p.C1) {
    const int64_t idx = (n * p.C1tot + grp * p.C1 + c) * p.Tp + tp;
    return p.p1 ? to_acc<acc_t>(p.p1[idx]) : p.p1_acc[idx];
  }
  return p.alpha2 * p.p2[(n * p.C2tot + grp * p.C2 + (c - p.C1)) * p.Tp + tp];
}

template <class scalar_t, class acc_t>
RVC_HD void wgrad_reduce(const WgradArgs<scalar_t, acc_t>& p, Block3 blk, int tid, acc_t* smem) {
  const int64_t ct = blk.x / p.o_tiles, ot = blk.x % p.o_tiles;
  const int64_t grp = blk.y / p.K, t = blk.y % p.K;
  const int lane = tid % kRedLanes, cg = (tid / kRedLanes) % 4, og = tid / (kRedLanes * 4);
  const int64_t c0 = ct * kWgTC + cg * kWgRC, o0 = ot * kWgTO + og * kWgRO;
  const int64_t C = p.C1 + p.C2;
  const int64_t z0 = blk.z * p.slice;
  const int64_t z1 = (z0 + p.slice < p.N * p.Tp) ? z0 + p.slice : p.N * p.Tp;

  acc_t acc[kWgRC][kWgRO];
  for (int a = 0; a < kWgRC; ++a)
    for (int b = 0; b < kWgRO; ++b) acc[a][b] = 0;
  for (int64_t z = z0 + lane; z < z1; z += kRedLanes) {
    const int64_t n = z / p.Tp, tp = z % p.Tp;
    const int64_t l = tp * p.S - p.P + t * p.D;
    if (l < 0 || l >= p.Lq) continue;
    acc_t sv[kWgRC], qv[kWgRO];
    for (int a = 0; a < kWgRC; ++a) sv[a] = (c0 + a < C) ? wgrad_src(p, n, grp, c0 + a, tp) : acc_t(0);
    for (int b = 0; b < kWgRO; ++b) {
      const int64_t o = o0 + b;
      const int64_t qi = (n * p.Cqtot + grp * p.Cq + o) * p.Lq + l;
      qv[b] = o < p.Cq ? to_acc<acc_t>(p.q[qi]) * dropout_factor(p.q_drop, qi) : acc_t(0);
    }
    for (int a = 0; a < kWgRC; ++a)
      for (int b = 0; b < kWgRO; ++b) acc[a][b] += sv[a] * qv[b];
  }
  for (int a = 0; a < kWgRC; ++a)
    for (int b = 0; b < kWgRO; ++b) smem[(a * kWgRO + b) * kThreads + tid] = acc[a][b];
}

template <class scalar_t, class acc_t>
RVC_HD void wgrad_store(const WgradArgs<scalar_t, acc_t>& p, Block3 blk, int tid, const acc_t* smem) {
  const int64_t ct = blk.x / p.o_tiles, ot = blk.x % p.o_tiles;
  const int64_t grp = blk.y / p.K, t = blk.y % p.K;
  const int64_t C = p.C1 + p.C2;
  // Entry (c, o) of the tile was accumulated by the 8 lanes of thread group (cg, og), slot (a, b).
  for (int e = tid; e < kWgTC * kWgTO; e += kThreads) {
    const int cl = e / kWgTO, ol = e % kWgTO;
    const int cg = cl / kWgRC, a = cl % kWgRC, og = ol / kWgRO, b = ol % kWgRO;
    const int64_t c = ct * kWgTC + cl, o = ot * kWgTO + ol;
    if (c >= C || o >= p.Cq) continue;
    acc_t v = 0;
    for (int lane = 0; lane < kRedLanes; ++lane) {
      const int owner = (og * 4 + cg) * kRedLanes + lane;
      v += smem[(a * kWgRO + b) * kThreads + owner];
    }
    p.out[(((blk.z * p.groups + grp) * C + c) * p.Cq + o) * p.K + t] = v;
  }
}

template <class Exec, class scalar_t, class acc_t>
RVC_HD void lora_convt_wgrad_block(const WgradArgs<scalar_t, acc_t>& p, Exec& ex) {
  acc_t* smem = static_cast<acc_t*>(ex.smem());
  const Block3 blk = ex.block();
  ex.phase([&](int tid) { wgrad_reduce(p, blk, tid, smem); });
  ex.phase([&](int tid) { wgrad_store(p, blk, tid, smem); });
}

// ================================================================== dropout mask (for tests)

template <class scalar_t, class acc_t>
RVC_HD void dropout_mask_fill(scalar_t* out, int64_t numel, const Dropout<acc_t>& d, int64_t idx) {
  if (idx < numel) out[idx] = from_acc<scalar_t>(dropout_factor(d, idx));
}

// ================================================================== host-side descriptors
//
// Type-erased launch descriptions shared by the CPU glue and the CUDA launchers, so that the
// .cu needs no torch header: the .cpp fills a descriptor, the executor instantiates the
// typed argument struct from it.

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct FwdDesc {
  const void *x, *w, *bias, *a, *b;
  void *y, *u;
  double scaling, dropout_p;
  int64_t seed;
  ConvTShape s;
};

struct BwdInputDesc {
  const void *g, *w, *a, *b;
  void *gx, *gu;
  double scaling, dropout_p;
  int64_t seed;
  ConvTShape s;
};

struct WgradDesc {
  const void *p1, *p1_acc, *p2, *q;
  void* out;
  double alpha2, q_dropout_p;
  int64_t q_seed;
  int64_t N, Tp, C1, C2, C1tot, C2tot, Cq, Cqtot, Lq, groups, S, P, D, K;
  int64_t c_tiles, o_tiles, splits, slice;  // filled by wgrad_plan
};

// The reduction plan (tiles and split of the (n, t') range) — identical on GPU and CPU.
inline void wgrad_plan(WgradDesc& d) {
  const int64_t C = d.C1 + d.C2;
  d.c_tiles = (C + kWgTC - 1) / kWgTC;
  d.o_tiles = (d.Cq + kWgTO - 1) / kWgTO;
  const int64_t blocks = d.c_tiles * d.o_tiles * d.groups * d.K;
  const int64_t positions = d.N * d.Tp;
  int64_t splits = (kTargetBlocks + blocks - 1) / blocks;
  const int64_t max_splits = (positions + kMinSlice - 1) / kMinSlice;
  if (splits > max_splits) splits = max_splits;
  if (splits < 1) splits = 1;
  d.slice = (positions + splits - 1) / splits;
  if (d.slice < 1) d.slice = 1;
  d.splits = (positions + d.slice - 1) / d.slice;
  if (d.splits < 1) d.splits = 1;
}

template <class scalar_t, class acc_t>
inline FwdArgs<scalar_t, acc_t> fwd_args(const FwdDesc& d) {
  FwdArgs<scalar_t, acc_t> p;
  p.x = static_cast<const scalar_t*>(d.x);
  p.w = static_cast<const scalar_t*>(d.w);
  p.bias = static_cast<const scalar_t*>(d.bias);
  p.a = static_cast<const scalar_t*>(d.a);
  p.b = static_cast<const scalar_t*>(d.b);
  p.y = static_cast<scalar_t*>(d.y);
  p.u_out = static_cast<acc_t*>(d.u);
  p.scaling = static_cast<acc_t>(d.scaling);
  p.s = d.s;
  p.drop = dropout_params<acc_t>(d.dropout_p, d.seed);
  return p;
}

template <class scalar_t, class acc_t>
inline BwdInputArgs<scalar_t, acc_t> bwd_input_args(const BwdInputDesc& d) {
  BwdInputArgs<scalar_t, acc_t> p;
  p.g = static_cast<const scalar_t*>(d.g);
  p.w = static_cast<const scalar_t*>(d.w);
  p.a = static_cast<const scalar_t*>(d.a);
  p.b = static_cast<const scalar_t*>(d.b);
  p.gx = static_cast<scalar_t*>(d.gx);
  p.gu_out = static_cast<acc_t*>(d.gu);
  p.scaling = static_cast<acc_t>(d.scaling);
  p.s = d.s;
  p.drop = dropout_params<acc_t>(d.dropout_p, d.seed);
  return p;
}

template <class scalar_t, class acc_t>
inline WgradArgs<scalar_t, acc_t> wgrad_args(const WgradDesc& d) {
  WgradArgs<scalar_t, acc_t> p;
  p.p1 = static_cast<const scalar_t*>(d.p1);
  p.p1_acc = static_cast<const acc_t*>(d.p1_acc);
  p.p2 = static_cast<const acc_t*>(d.p2);
  p.q = static_cast<const scalar_t*>(d.q);
  p.alpha2 = static_cast<acc_t>(d.alpha2);
  p.N = d.N;
  p.Tp = d.Tp;
  p.C1 = d.C1;
  p.C2 = d.C2;
  p.C1tot = d.C1tot;
  p.C2tot = d.C2tot;
  p.Cq = d.Cq;
  p.Cqtot = d.Cqtot;
  p.Lq = d.Lq;
  p.groups = d.groups;
  p.S = d.S;
  p.P = d.P;
  p.D = d.D;
  p.K = d.K;
  p.c_tiles = d.c_tiles;
  p.o_tiles = d.o_tiles;
  p.splits = d.splits;
  p.slice = d.slice;
  p.q_drop = dropout_params<acc_t>(d.q_dropout_p, d.q_seed);
  p.out = static_cast<acc_t*>(d.out);
  return p;
}

}  // namespace rvclora
