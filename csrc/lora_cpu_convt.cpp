// The `cpu` backend's ConvTranspose1d: convt_fwd and convt_bwd (declared in lora_cpu_ops.h), the
// geometry, the BLAS time-block passes and the SIMD dispatch (csrc/lora_cpu_simd.cpp).
#include "lora_cpu_ops.h"
#include "lora_cpu_simd.h"

namespace rvclora_cpu {
namespace {

// --------------------------------------------------------------------------- ConvTranspose1d

struct CTGeom {
  int64_t N, Cin, T, Cout, K, r, stride, pad, opad, dil, G, L, cin_g, cout_g, rg;
};

CTGeom convt_geom(const Tensor& x, const Tensor& weight, const Tensor& A, const Tensor& B, int64_t stride,
                  int64_t padding, int64_t output_padding, int64_t dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 3, "rvclora cpu: conv_transpose1d x must be (N, C_in, T), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 3, "rvclora cpu: conv_transpose1d weight must be (C_in, C_out/groups, K), got ",
              weight.sizes());
  TORCH_CHECK(stride >= 1 && dilation >= 1 && groups >= 1 && padding >= 0 && output_padding >= 0,
              "rvclora cpu: need stride, dilation, groups >= 1 and padding, output_padding >= 0");
  CTGeom g{};
  g.N = x.size(0), g.Cin = x.size(1), g.T = x.size(2);
  g.K = weight.size(2), g.G = groups, g.Cout = weight.size(1) * groups, g.r = A.size(0);
  g.stride = stride, g.pad = padding, g.opad = output_padding, g.dil = dilation;
  TORCH_CHECK(weight.size(0) == g.Cin, "rvclora cpu: weight.shape[0] must equal C_in = ", g.Cin);
  TORCH_CHECK(g.Cin % groups == 0 && g.r % groups == 0, "rvclora cpu: C_in and r must be divisible by groups=",
              groups);
  g.cin_g = g.Cin / groups, g.cout_g = weight.size(1), g.rg = g.r / groups;
  TORCH_CHECK(A.size(1) == g.cin_g, "rvclora cpu: lora_A must be (r, C_in/groups) = (", g.r, ", ", g.cin_g,
              "), got ", A.sizes());
  TORCH_CHECK(B.size(0) == g.r && B.size(1) == g.cout_g * g.K, "rvclora cpu: lora_B must be (r, C_out/groups*K) = (",
              g.r, ", ", g.cout_g * g.K, "), got ", B.sizes());
  g.L = (g.T - 1) * stride - 2 * padding + dilation * (g.K - 1) + output_padding + 1;
  TORCH_CHECK(g.L >= 1, "rvclora cpu: conv_transpose1d output length ", g.L, " must be positive");
  return g;
}

// --------------------------------------------------------------------------- ConvTranspose1d through BLAS
// u = A·D(x) at the input's rate; g_u = s·Σ_tap Bt_tap·g_tap and grad_B_tap += u·g_tapᵀ, where
// g_tap[o, t] = g[o, t·stride + tap·dil − pad] is gathered per block (a view when stride is 1);
// grad_A += g_u·D(x)ᵀ and the unmerged input gradient's term D(Aᵀ·g_u) stay inside the block.

template <class T>
struct CTFwdB {
  const T* x;
  const T* A;  // (r, cin_g)
  T* u;        // (N, r, T)
  CTGeom g;
  Dropout<T> d;
  int64_t tb, nblk;
};

// D(x) rows of group grp for input time [t0, t1): a view of x without dropout, else masked into buf.
template <class T>
std::pair<const T*, int64_t> convt_x_block(const T* x, const CTGeom& g, const Dropout<T>& d, int64_t n, int64_t grp,
                                           int64_t t0, int64_t t1, int64_t ldb, T* buf) {
  const int64_t row0 = n * g.Cin + grp * g.cin_g;
  if (!d.on) return {x + row0 * g.T + t0, g.T};
  for (int64_t i = 0; i < g.cin_g; ++i) {
    const int64_t base = (row0 + i) * g.T;
    for (int64_t t = t0; t < t1; ++t) buf[i * ldb + t - t0] = x[base + t] * d.at(base + t);
  }
  return {buf, ldb};
}

template <class T>
void convt_fwd_blas(const CTFwdB<T>& p) {
  const CTGeom& g = p.g;
  at::parallel_for(0, g.N * g.G * p.nblk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> buf(p.d.on ? static_cast<size_t>(g.cin_g * p.tb) : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t blk = b % p.nblk, grp = (b / p.nblk) % g.G, n = b / (p.nblk * g.G);
      const int64_t t0 = blk * p.tb, t1 = std::min(t0 + p.tb, g.T), len = t1 - t0;
      auto [xv, ldx] = convt_x_block(p.x, g, p.d, n, grp, t0, t1, p.tb, buf.data());
      gemm_rm<T>(false, false, g.rg, len, g.cin_g, T(1), p.A + grp * g.rg * g.cin_g, g.cin_g, xv, ldx, T(0),
                 p.u + (n * g.r + grp * g.rg) * g.T + t0, g.T);
    }
  });
}

template <class T>
struct CTBwdB {
  const T* gy;  // (N, Cout, L)
  const T* x;   // (N, Cin, T)
  const T* u;   // (N, r, T)
  const T* A;   // (r, cin_g)
  const T* Bt;  // (K, r, cout_g)
  T* gx;        // (N, Cin, T) += D(Aᵀ·g_u) when not merged, else null
  Partials<T>* pA;  // (r, cin_g)
  Partials<T>* pB;  // (K, r, cout_g), without the factor s
  T s;
  CTGeom g;
  Dropout<T> d;
  int64_t tb, nblk;
};

template <class T>
void convt_bwd_blas(const CTBwdB<T>& p) {
  const CTGeom& g = p.g;
  at::parallel_for(0, g.N * g.G * p.nblk, 1, [&](int64_t b0, int64_t b1) {
    T* gA = p.pA->mine();
    T* gB = p.pB->mine();
    std::vector<T> gub(static_cast<size_t>(g.rg * p.tb)), gs(static_cast<size_t>(g.cout_g * p.tb));
    std::vector<T> buf(static_cast<size_t>(g.cin_g * p.tb));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t blk = b % p.nblk, grp = (b / p.nblk) % g.G, n = b / (p.nblk * g.G);
      const int64_t t0 = blk * p.tb, t1 = std::min(t0 + p.tb, g.T), len = t1 - t0;
      const int64_t grow0 = n * g.Cout + grp * g.cout_g;
      std::fill(gub.begin(), gub.end(), T(0));
      for (int64_t tap = 0; tap < g.K; ++tap) {
        const int64_t off = tap * g.dil - g.pad;
        // t·stride + off in [0, L)
        const int64_t lo = std::max(t0, off >= 0 ? 0 : (-off + g.stride - 1) / g.stride);
        const int64_t hi = std::min(t1, g.L - 1 - off < 0 ? 0 : (g.L - 1 - off) / g.stride + 1);
        if (lo >= hi) continue;
        const T* gv;
        int64_t ldg;
        if (g.stride == 1) {
          gv = p.gy + grow0 * g.L + lo + off, ldg = g.L;
        } else {
          for (int64_t o = 0; o < g.cout_g; ++o) {
            const T* row = p.gy + (grow0 + o) * g.L + off;
            T* dst = gs.data() + o * p.tb;
            for (int64_t t = lo; t < hi; ++t) dst[t - lo] = row[t * g.stride];
          }
          gv = gs.data(), ldg = p.tb;
        }
        gemm_rm<T>(false, false, g.rg, hi - lo, g.cout_g, p.s, p.Bt + (tap * g.r + grp * g.rg) * g.cout_g, g.cout_g,
                   gv, ldg, T(1), gub.data() + (lo - t0), p.tb);
        if (gB)
          gemm_rm<T>(false, true, g.rg, g.cout_g, hi - lo, T(1), p.u + (n * g.r + grp * g.rg) * g.T + lo, g.T, gv, ldg,
                     T(1), gB + (tap * g.r + grp * g.rg) * g.cout_g, g.cout_g);
      }
      if (gA) {
        auto [xv, ldx] = convt_x_block(p.x, g, p.d, n, grp, t0, t1, p.tb, buf.data());
        gemm_rm<T>(false, true, g.rg, g.cin_g, len, T(1), gub.data(), p.tb, xv, ldx, T(1), gA + grp * g.rg * g.cin_g,
                   g.cin_g);
      }
      if (p.gx) {
        const int64_t row0 = n * g.Cin + grp * g.cin_g;
        if (!p.d.on) {
          gemm_rm<T>(true, false, g.cin_g, len, g.rg, T(1), p.A + grp * g.rg * g.cin_g, g.cin_g, gub.data(), p.tb, T(1),
                     p.gx + row0 * g.T + t0, g.T);
        } else {
          gemm_rm<T>(true, false, g.cin_g, len, g.rg, T(1), p.A + grp * g.rg * g.cin_g, g.cin_g, gub.data(), p.tb, T(0),
                     buf.data(), p.tb);
          for (int64_t i = 0; i < g.cin_g; ++i) {
            const int64_t base = (row0 + i) * g.T;
            for (int64_t t = t0; t < t1; ++t) p.gx[base + t] += buf[i * p.tb + t - t0] * p.d.at(base + t);
          }
        }
      }
    }
  });
}

// gB (r, cout_g·K) = s · Σ over threads of the tap-major partials (K, r, cout_g).
template <class T>
void reduce_convt_B(const Partials<T>& pB, T* out, const CTGeom& g, T s) {
  for (int64_t tap = 0; tap < g.K; ++tap)
    for (int64_t j = 0; j < g.r; ++j)
      for (int64_t o = 0; o < g.cout_g; ++o) {
        const int64_t src = (tap * g.r + j) * g.cout_g + o;
        T acc = 0;
        for (int64_t t = 0; t < pB.nthreads; ++t) acc += pB.buf[static_cast<size_t>(t * pB.size + src)];
        out[(j * g.cout_g + o) * g.K + tap] = s * acc;
      }
}

int64_t ct_largest(const CTGeom& g) {
  return std::max({g.N * g.Cout * g.L, g.N * g.Cin * g.T, g.Cin * g.cout_g * g.K});
}

// --------------------------------------------------------------------------- merged weight

// W + s·ΔW for ConvTranspose1d: W (Cin, cout_g, K), A (r, cin_g), B (r, cout_g·K).
Tensor merged_convt_weight(const Tensor& W, const Tensor& A, const Tensor& B, double s, int64_t G) {
  const int64_t cin = W.size(0);
  if (G == 1) return at::addmm(W.reshape({cin, -1}), A.t(), B, 1.0, s).view(W.sizes());
  const int64_t rg = A.size(0) / G;
  return at::baddbmm(W.reshape({G, cin / G, -1}), A.reshape({G, rg, cin / G}).transpose(1, 2),
                     B.reshape({G, rg, -1}), 1.0, s)
      .view(W.sizes());
}

// --------------------------------------------------------------------------- ConvTranspose1d ops

// The hand-vectorised passes (csrc/lora_cpu_simd.cpp) run float32 calls with groups 1 and no dropout, on a
// CPU with AVX2+FMA or AVX-512: u = A·x is the Conv1d u pass with one tap, the backward's g_u, grad_A
// and grad_B run on g split by phase (t mod stride), and the unmerged input gradient's term Aᵀ·g_u is the
// Conv1d one with one tap.
bool simd_convt(const Tensor& x, const CTGeom& g, double dropout_p) {
  return x.scalar_type() == at::kFloat && dropout_p == 0.0 && g.G == 1 && rvclora_cpu_simd::isa() > 0 &&
         g.N * g.T > 0;
}

rvclora_cpu_simd::TDims simd_tdims(const CTGeom& g) {
  return {g.N, g.Cin, g.T, g.Cout, g.K, g.r, g.stride, g.pad, g.dil, g.L};
}

// u = A·x (and grad_x += Aᵀ·g_u) as a Conv1d with one tap over the input's time.
rvclora_cpu_simd::Dims simd_pointwise(const CTGeom& g) { return {g.N, g.Cin, g.T, g.r, 1, g.r, 0, 1, g.T}; }

// Merging costs a pass over the weight (in·out/g·k) per call; when the weight dwarfs the input
// (RVC's first upsampler: 32 frames, a 512×256×16 weight) the separate LoRA term is cheaper.
bool convt_merge_pays(const Tensor& x, const Tensor& weight) { return weight.numel() <= x.numel() * weight.size(2); }

// y (N, Cout, L) += s·Σ_{j,k} B[j, o·K + k]·u[j, t] at l = t·stride + k·dil − pad (groups 1).
void y_add_convt_lora(Tensor& y, const Tensor& u, const Tensor& B, const CTGeom& g, double s) {
  const Tensor cols = at::matmul(B.t(), u).contiguous();  // (N, Cout·K, T)
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "rvclora_cpu_convt_col2im", [&] {
    const scalar_t* c = cols.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const scalar_t sc = static_cast<scalar_t>(s);
    at::parallel_for(0, g.N * g.Cout, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        scalar_t* yr = yp + row * g.L;
        const int64_t n = row / g.Cout, o = row % g.Cout;
        for (int64_t k = 0; k < g.K; ++k) {
          const scalar_t* cr = c + ((n * g.Cout + o) * g.K + k) * g.T;
          const int64_t off = k * g.dil - g.pad;
          // t with 0 ≤ t·stride + off < L
          const int64_t lo = off >= 0 ? 0 : (-off + g.stride - 1) / g.stride;
          const int64_t hi = g.L - 1 - off < 0 ? 0 : std::min(g.T, (g.L - 1 - off) / g.stride + 1);
          for (int64_t t = lo; t < hi; ++t) yr[t * g.stride + off] += sc * cr[t];
        }
      }
    });
  });
}

}  // namespace

std::tuple<Tensor, Tensor> convt_fwd(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                     const Tensor& lora_A, const Tensor& lora_B, double scaling, int64_t stride,
                                     int64_t padding, int64_t output_padding, int64_t dilation, int64_t groups,
                                     double dropout_p, const std::optional<Tensor>& seed) {
  check_common(x, weight, lora_A, lora_B);
  const CTGeom g = convt_geom(x, weight, lora_A, lora_B, stride, padding, output_padding, dilation, groups);
  const Tensor A = factor(lora_A, x), B = factor(lora_B, x);
  const Tensor xc = x.contiguous();
  Tensor u = at::empty({g.N, g.r, g.T}, x.options());
  const bool simd = simd_convt(x, g, dropout_p);
  if (!simd) check_blas(x, ct_largest(g));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rvclora_cpu_convt_fwd", [&] {
    if (simd) {
      rvclora_cpu_simd::conv1d_u(xc.const_data_ptr<float>(), A.const_data_ptr<float>(), u.mutable_data_ptr<float>(),
                                 simd_pointwise(g));
      return;
    }
    CTFwdB<scalar_t> p{xc.const_data_ptr<scalar_t>(), A.const_data_ptr<scalar_t>(), u.mutable_data_ptr<scalar_t>(), g,
                       make_dropout<scalar_t>(seed, dropout_p), 0, 0};
    p.tb = blas_block_len(g.T, g.N * g.G, g.cin_g);
    p.nblk = (g.T + p.tb - 1) / p.tb;
    convt_fwd_blas<scalar_t>(p);
  });
  const bool merged = dropout_p == 0.0 && convt_merge_pays(x, weight);
  const Tensor w = merged ? merged_convt_weight(weight, A, B, scaling, groups) : weight;
  Tensor y = at::convolution(xc, w, bias, {stride}, {padding}, {dilation}, true, {output_padding}, groups).contiguous();
  if (!merged && groups == 1) {
    // y += s·col2im(Bᵀ·u): one GEMM per sample (K·C_out × r × T), then every column is added at its output
    // position; the library's transposed convolution with r input channels ran this at a fraction of the speed
    y_add_convt_lora(y, u, B, g, scaling);
  } else if (!merged) {
    const Tensor lora = at::convolution(u, B.view({g.r, g.cout_g, g.K}), std::nullopt, {stride}, {padding},
                                        {dilation}, true, {output_padding}, groups);
    y.add_(lora, scaling);
  }
  return {y, u};
}

Grads5 convt_bwd(const Tensor& grad_y, const Tensor& x, const Tensor& u, const Tensor& weight, const Tensor& lora_A,
                 const Tensor& lora_B, double scaling, int64_t stride, int64_t padding, int64_t output_padding,
                 int64_t dilation, int64_t groups, double dropout_p, const std::optional<Tensor>& seed,
                 std::array<bool, 5> needs) {
  check_common(x, weight, lora_A, lora_B);
  const CTGeom g = convt_geom(x, weight, lora_A, lora_B, stride, padding, output_padding, dilation, groups);
  const bool need_x = needs[0], need_w = needs[1], need_b = needs[2], need_A = needs[3], need_B = needs[4];
  const Tensor A = factor(lora_A, x), B = factor(lora_B, x);
  const Tensor xc = x.contiguous(), gy = grad_y.to(x.scalar_type()).contiguous(), uc = u.contiguous();
  TORCH_CHECK(gy.sizes() == at::IntArrayRef({g.N, g.Cout, g.L}), "rvclora cpu: grad_y must be ",
              at::IntArrayRef({g.N, g.Cout, g.L}), ", got ", grad_y.sizes());
  const bool merged = dropout_p == 0.0 && convt_merge_pays(x, weight);
  Tensor gx = empty0(x), gw = empty0(x), gbias = empty0(x), gA_ = empty0(x), gB_ = empty0(x);
  if (need_x || need_w || need_b) {
    const Tensor w = merged ? merged_convt_weight(weight, A, B, scaling, groups) : weight;
    std::optional<at::IntArrayRef> bias_sizes;
    const std::vector<int64_t> bsz{g.Cout};
    if (need_b) bias_sizes = at::IntArrayRef(bsz);
    auto [gx_, gw_, gbias_] = at::convolution_backward(gy, xc, w, bias_sizes, {stride}, {padding}, {dilation}, true,
                                                    {output_padding}, groups, {need_x, need_w, need_b});
    if (need_x) gx = gx_.contiguous();
    if (need_w) gw = like_input(gw_, weight);
    if (need_b) gbias = gbias_;
  }
  const bool lora_x = need_x && !merged;
  if (simd_convt(x, g, dropout_p) && (need_A || need_B || lora_x)) {
    if (need_A) gA_ = at::empty({g.r, g.cin_g}, x.options());
    if (need_B) gB_ = at::empty({g.r, g.cout_g * g.K}, x.options());
    Tensor gu = lora_x ? at::empty({g.N, g.r, g.T}, x.options()) : Tensor();
    rvclora_cpu_simd::convt_bwd(gy.const_data_ptr<float>(), xc.const_data_ptr<float>(), uc.const_data_ptr<float>(),
                                B.const_data_ptr<float>(), static_cast<float>(scaling),
                                need_A ? gA_.mutable_data_ptr<float>() : nullptr,
                                need_B ? gB_.mutable_data_ptr<float>() : nullptr,
                                lora_x ? gu.mutable_data_ptr<float>() : nullptr, simd_tdims(g));
    if (lora_x)
      rvclora_cpu_simd::conv1d_grad_x(gu.const_data_ptr<float>(), A.const_data_ptr<float>(),
                                      gx.mutable_data_ptr<float>(), simd_pointwise(g));
  } else if (need_A || need_B || lora_x) {
    check_blas(x, ct_largest(g));
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rvclora_cpu_convt_bwd", [&] {
      const Tensor Bt = B.view({g.r, g.cout_g, g.K}).permute({2, 0, 1}).contiguous();
      Partials<scalar_t> pA(g.r * g.cin_g, need_A), pB(g.K * g.r * g.cout_g, need_B);
      CTBwdB<scalar_t> p{gy.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), uc.const_data_ptr<scalar_t>(),
                         A.const_data_ptr<scalar_t>(), Bt.const_data_ptr<scalar_t>(),
                         lora_x ? gx.mutable_data_ptr<scalar_t>() : nullptr, &pA, &pB,
                         static_cast<scalar_t>(scaling), g, make_dropout<scalar_t>(seed, dropout_p), 0, 0};
      // a block holds g's gathered taps (C_out/groups rows, stride× the input block's span)
      p.tb = blas_block_len(g.T, g.N * g.G, std::max(g.cin_g, g.cout_g * g.stride));
      p.nblk = (g.T + p.tb - 1) / p.tb;
      convt_bwd_blas<scalar_t>(p);
      if (need_A) {
        gA_ = at::empty({g.r, g.cin_g}, x.options());
        pA.reduce_into(gA_.mutable_data_ptr<scalar_t>(), scalar_t(1));
      }
      if (need_B) {
        gB_ = at::empty({g.r, g.cout_g * g.K}, x.options());
        reduce_convt_B(pB, gB_.mutable_data_ptr<scalar_t>(), g, static_cast<scalar_t>(scaling));
      }
    });
  }
  if (need_x) gx = grad_input_layout(gx, x, false);
  if (need_A) gA_ = like_input(gA_, lora_A);
  if (need_B) gB_ = like_input(gB_, lora_B);
  return {gx, gw, gbias, gA_, gB_};
}

}  // namespace rvclora_cpu
