// The body of the thin-pass kernels (see lora_cpu_simd.h), included by csrc/lora_cpu_simd.cpp once per
// instruction set, inside a `#pragma GCC target` region and a namespace that defines:
//   V       the vector traits: v, W (lanes), zero, load, load_win (lanes outside [0, lim) read 0),
//           store, store_n (the first n lanes), set1, fma, hsum
//   RBM, NV rows × vectors of the forward microkernel's register tile
//   RRB, QB rows × columns of the reduction microkernel's register tile
// Nothing here is meant to be included anywhere else (no include guard on purpose).

// The first nvalid samples of an RB × NV register tile to out (rows ldo apart), added to it with ACC.
template <int RB, bool ACC>
inline __attribute__((always_inline)) void store_tile(const typename V::v (&acc)[RB][NV], float* out, int64_t ldo,
                                                      int64_t nvalid) {
#pragma GCC unroll 8
  for (int rb = 0; rb < RB; ++rb)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const int64_t n = nvalid - v * V::W;
      float* o = out + rb * ldo + v * V::W;
      if (n >= V::W)
        V::store(o, ACC ? V::add(V::load(o), acc[rb][v]) : acc[rb][v]);
      else if (n > 0)
        V::store_n(o, ACC ? V::add(V::load_win(o, 0, n), acc[rb][v]) : acc[rb][v], static_cast<int>(n));
    }
}

// out[rb][0 .. nvalid) (+)= bias[rb] + Σ_c Σ_k w[rb·ldw + c·K + k] · x[c·ldx + t + k·dil + off]   (x reads 0
// outside [0, Tx); no bias term where bias is null); ACC adds to out instead of overwriting it.
template <int RB, bool IN, bool ACC>
inline __attribute__((always_inline)) void thin_micro(const float* x, int64_t ldx, int64_t Tx, int64_t C, int64_t K,
                                                      int64_t dil, int64_t off, const float* w, int64_t ldw, float* out,
                                                      int64_t ldo, int64_t t, int64_t nvalid, const float* bias) {
  typename V::v acc[RB][NV];
#pragma GCC unroll 8
  for (int rb = 0; rb < RB; ++rb)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[rb][v] = bias ? V::set1(bias[rb]) : V::zero();
  for (int64_t c = 0; c < C; ++c) {
    const float* xr = x + c * ldx;
    const float* wc = w + c * K;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t pos = t + k * dil + off;
      typename V::v xv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) xv[v] = IN ? V::load(xr + pos + v * V::W) : V::load_win(xr, pos + v * V::W, Tx);
#pragma GCC unroll 8
      for (int rb = 0; rb < RB; ++rb) {
        const typename V::v b = V::set1(wc[rb * ldw + k]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[rb][v] = V::fma(b, xv[v], acc[rb][v]);
      }
    }
  }
  store_tile<RB, ACC>(acc, out, ldo, nvalid);
}

template <int RB, bool IN, bool ACC>
inline __attribute__((always_inline)) void thin_tail(int64_t rem, const float* x, int64_t ldx, int64_t Tx, int64_t C,
                                                     int64_t K, int64_t dil, int64_t off, const float* w, int64_t ldw,
                                                     float* out, int64_t ldo, int64_t t, int64_t nvalid,
                                                     const float* bias) {
  if constexpr (RB > 0) {
    if (rem == RB)
      thin_micro<RB, IN, ACC>(x, ldx, Tx, C, K, dil, off, w, ldw, out, ldo, t, nvalid, bias);
    else
      thin_tail<RB - 1, IN, ACC>(rem, x, ldx, Tx, C, K, dil, off, w, ldw, out, ldo, t, nvalid, bias);
  }
}

// All R rows of out over time [t0, t1): out[row][t - t0] for t in [t0, t1) (added to it with ACC), plus
// bias[row] where bias is not null.
template <bool ACC = false>
inline void thin_pass(const float* x, int64_t ldx, int64_t Tx, int64_t C, int64_t K, int64_t dil, int64_t off,
                      const float* w, int64_t ldw, int64_t R, float* out, int64_t ldo, int64_t t0, int64_t t1,
                      const float* bias = nullptr) {
  constexpr int64_t step = NV * V::W;
  for (int64_t t = t0; t < t1; t += step) {
    const int64_t nvalid = std::min<int64_t>(step, t1 - t);
    float* o = out + (t - t0);
    const bool in = t + off >= 0 && t + (K - 1) * dil + off + step <= Tx;
    int64_t r0 = 0;
    const auto bias_at = [&](int64_t row) { return bias ? bias + row : nullptr; };
    if (in) {
      for (; r0 + RBM <= R; r0 += RBM)
        thin_micro<RBM, true, ACC>(x, ldx, Tx, C, K, dil, off, w + r0 * ldw, ldw, o + r0 * ldo, ldo, t, nvalid,
                                   bias_at(r0));
      thin_tail<RBM - 1, true, ACC>(R - r0, x, ldx, Tx, C, K, dil, off, w + r0 * ldw, ldw, o + r0 * ldo, ldo, t, nvalid,
                                    bias_at(r0));
    } else {
      for (; r0 + RBM <= R; r0 += RBM)
        thin_micro<RBM, false, ACC>(x, ldx, Tx, C, K, dil, off, w + r0 * ldw, ldw, o + r0 * ldo, ldo, t, nvalid,
                                    bias_at(r0));
      thin_tail<RBM - 1, false, ACC>(R - r0, x, ldx, Tx, C, K, dil, off, w + r0 * ldw, ldw, o + r0 * ldo, ldo, t,
                                     nvalid, bias_at(r0));
    }
  }
}

// out[rb][0 .. nvalid) = Σ_q w[rb·ldw + q] · X[coff[q] + t + cshift[q]]   (each row reads 0 outside [0, Tx)):
// the thin pass over columns given by a table (ConvTranspose1d's phase-split g).
template <int RB, bool IN>
inline __attribute__((always_inline)) void tab_micro(const float* X, const int64_t* coff, const int64_t* cshift,
                                                     int64_t Tx, int64_t ncol, const float* w, int64_t ldw, float* out,
                                                     int64_t ldo, int64_t t, int64_t nvalid) {
  typename V::v acc[RB][NV];
#pragma GCC unroll 8
  for (int rb = 0; rb < RB; ++rb)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[rb][v] = V::zero();
  for (int64_t q = 0; q < ncol; ++q) {
    const float* xr = X + coff[q];
    const int64_t pos = t + cshift[q];
    typename V::v xv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) xv[v] = IN ? V::load(xr + pos + v * V::W) : V::load_win(xr, pos + v * V::W, Tx);
#pragma GCC unroll 8
    for (int rb = 0; rb < RB; ++rb) {
      const typename V::v b = V::set1(w[rb * ldw + q]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[rb][v] = V::fma(b, xv[v], acc[rb][v]);
    }
  }
  store_tile<RB, false>(acc, out, ldo, nvalid);
}

template <int RB, bool IN>
inline __attribute__((always_inline)) void tab_tail(int64_t rem, const float* X, const int64_t* coff,
                                                    const int64_t* cshift, int64_t Tx, int64_t ncol, const float* w,
                                                    int64_t ldw, float* out, int64_t ldo, int64_t t, int64_t nvalid) {
  if constexpr (RB > 0) {
    if (rem == RB)
      tab_micro<RB, IN>(X, coff, cshift, Tx, ncol, w, ldw, out, ldo, t, nvalid);
    else
      tab_tail<RB - 1, IN>(rem, X, coff, cshift, Tx, ncol, w, ldw, out, ldo, t, nvalid);
  }
}

// All R rows over time [t0, t1); lo/hi: the smallest and largest shift in cshift.
inline void tab_pass(const float* X, const int64_t* coff, const int64_t* cshift, int64_t lo, int64_t hi, int64_t Tx,
                     int64_t ncol, const float* w, int64_t ldw, int64_t R, float* out, int64_t ldo, int64_t t0,
                     int64_t t1) {
  constexpr int64_t step = NV * V::W;
  for (int64_t t = t0; t < t1; t += step) {
    const int64_t nvalid = std::min<int64_t>(step, t1 - t);
    float* o = out + (t - t0);
    int64_t r0 = 0;
    if (t + lo >= 0 && t + hi + step <= Tx) {
      for (; r0 + RBM <= R; r0 += RBM)
        tab_micro<RBM, true>(X, coff, cshift, Tx, ncol, w + r0 * ldw, ldw, o + r0 * ldo, ldo, t, nvalid);
      tab_tail<RBM - 1, true>(R - r0, X, coff, cshift, Tx, ncol, w + r0 * ldw, ldw, o + r0 * ldo, ldo, t, nvalid);
    } else {
      for (; r0 + RBM <= R; r0 += RBM)
        tab_micro<RBM, false>(X, coff, cshift, Tx, ncol, w + r0 * ldw, ldw, o + r0 * ldo, ldo, t, nvalid);
      tab_tail<RBM - 1, false>(R - r0, X, coff, cshift, Tx, ncol, w + r0 * ldw, ldw, o + r0 * ldo, ldo, t, nvalid);
    }
  }
}

// out[rb·o_r + qout[q]] += Σ_{i < nvec·W} P[rb·ldp + i] · Q[qoff[q] + t0 + qshift[q] + i]
// (Q reads 0 outside [0, qlim) of its row; P is zero past the tile's valid length).
template <int RB, int QBN, bool IN>
inline __attribute__((always_inline)) void red_micro_(const float* P, int64_t ldp, int64_t nvec, const float* Q,
                                                      const int64_t* qoff, const int64_t* qshift, int64_t qlim,
                                                      int64_t t0, float* out, int64_t o_r, const int64_t* qout) {
  typename V::v acc[RB][QBN];
#pragma GCC unroll 8
  for (int rb = 0; rb < RB; ++rb)
#pragma GCC unroll 4
    for (int q = 0; q < QBN; ++q) acc[rb][q] = V::zero();
  const float* qr[QBN];
  int64_t pos0[QBN];
#pragma GCC unroll 4
  for (int q = 0; q < QBN; ++q) qr[q] = Q + qoff[q], pos0[q] = t0 + qshift[q];
  for (int64_t iv = 0; iv < nvec; ++iv) {
    typename V::v p[RB];
#pragma GCC unroll 8
    for (int rb = 0; rb < RB; ++rb) p[rb] = V::load(P + rb * ldp + iv * V::W);
#pragma GCC unroll 4
    for (int q = 0; q < QBN; ++q) {
      const int64_t pos = pos0[q] + iv * V::W;
      const typename V::v xq =
          (IN || (pos >= 0 && pos + V::W <= qlim)) ? V::load(qr[q] + pos) : V::load_win(qr[q], pos, qlim);
#pragma GCC unroll 8
      for (int rb = 0; rb < RB; ++rb) acc[rb][q] = V::fma(p[rb], xq, acc[rb][q]);
    }
  }
#pragma GCC unroll 8
  for (int rb = 0; rb < RB; ++rb)
#pragma GCC unroll 4
    for (int q = 0; q < QBN; ++q) out[rb * o_r + qout[q]] += V::hsum(acc[rb][q]);
}

// The columns' whole windows inside [0, qlim): no edge checks in the loop.
template <int RB, int QBN>
inline __attribute__((always_inline)) void red_micro(const float* P, int64_t ldp, int64_t nvec, const float* Q,
                                                     const int64_t* qoff, const int64_t* qshift, int64_t qlim,
                                                     int64_t t0, float* out, int64_t o_r, const int64_t* qout) {
  bool in = true;
  for (int q = 0; q < QBN; ++q) in = in && t0 + qshift[q] >= 0 && t0 + qshift[q] + nvec * V::W <= qlim;
  if (in)
    red_micro_<RB, QBN, true>(P, ldp, nvec, Q, qoff, qshift, qlim, t0, out, o_r, qout);
  else
    red_micro_<RB, QBN, false>(P, ldp, nvec, Q, qoff, qshift, qlim, t0, out, o_r, qout);
}

template <int RB, int QBT>
inline __attribute__((always_inline)) void red_cols(const float* P, int64_t ldp, int64_t nvec, const float* Q,
                                                    const int64_t* qoff, const int64_t* qshift, int64_t qlim, int64_t t0,
                                                    int64_t ncol, float* out, int64_t o_r, const int64_t* qout) {
  int64_t q = 0;
  for (; q + QBT <= ncol; q += QBT)
    red_micro<RB, QBT>(P, ldp, nvec, Q, qoff + q, qshift + q, qlim, t0, out, o_r, qout + q);
  for (; q < ncol; ++q) red_micro<RB, 1>(P, ldp, nvec, Q, qoff + q, qshift + q, qlim, t0, out, o_r, qout + q);
}

template <int RB, int QBT>
inline __attribute__((always_inline)) void red_tail(int64_t rem, const float* P, int64_t ldp, int64_t nvec,
                                                    const float* Q, const int64_t* qoff, const int64_t* qshift,
                                                    int64_t qlim, int64_t t0, int64_t ncol, float* out, int64_t o_r,
                                                    const int64_t* qout) {
  if constexpr (RB > 0) {
    if (rem == RB)
      red_cols<RB, QBT>(P, ldp, nvec, Q, qoff, qshift, qlim, t0, ncol, out, o_r, qout);
    else
      red_tail<RB - 1, QBT>(rem, P, ldp, nvec, Q, qoff, qshift, qlim, t0, ncol, out, o_r, qout);
  }
}

// All R rows of P against all ncol columns of Q.
template <int RRBT, int QBT>
inline void red_pass(const float* P, int64_t ldp, int64_t R, int64_t nvec, const float* Q, const int64_t* qoff,
                     const int64_t* qshift, int64_t qlim, int64_t t0, int64_t ncol, float* out, int64_t o_r,
                     const int64_t* qout) {
  int64_t r0 = 0;
  for (; r0 + RRBT <= R; r0 += RRBT)
    red_cols<RRBT, QBT>(P + r0 * ldp, ldp, nvec, Q, qoff, qshift, qlim, t0, ncol, out + r0 * o_r, o_r, qout);
  red_tail<RRBT - 1, QBT>(R - r0, P + r0 * ldp, ldp, nvec, Q, qoff, qshift, qlim, t0, ncol, out + r0 * o_r, o_r, qout);
}


// ---- per-block entry points (called from the drivers in lora_cpu_simd.cpp)

void u_block(const float* x, const float* A, float* u, const rvclora_cpu_simd::Dims& d, int64_t n, int64_t t0,
             int64_t t1) {
  thin_pass(x + n * d.Cin * d.T, d.T, d.T, d.Cin, d.K, d.dil, -d.padl, A, d.Cin * d.K, d.r,
            u + n * d.r * d.Tout + t0, d.Tout, t0, t1);
}

// One block of the backward: gu_loc and u_loc are (r, ldl) scratch rows, ldl ≥ the block rounded up to W.
void bwd_block(const float* g, const float* x, const float* u, const float* Bs, const rvclora_cpu_simd::Dims& d,
               int64_t n, int64_t t0, int64_t t1, float* gu_loc, float* u_loc, int64_t ldl, float* pA, float* pB,
               float* gu_out, const int64_t* a_off, const int64_t* a_shift, const int64_t* a_out, const int64_t* b_off,
               const int64_t* b_shift, const int64_t* b_out) {
  const int64_t len = t1 - t0, nvec = (len + V::W - 1) / V::W, padded = nvec * V::W;
  const float* gn = g + n * d.Cout * d.Tout;
  if (pA || gu_out) {
    // g_u = s·Bᵀ g on this block (Bs = s·Bᵀ, (r, Cout)), zero past the block's end
    thin_pass(gn, d.Tout, d.Tout, d.Cout, 1, 0, 0, Bs, d.Cout, d.r, gu_loc, ldl, t0, t1);
    for (int64_t j = 0; j < d.r; ++j)
      for (int64_t i = len; i < padded; ++i) gu_loc[j * ldl + i] = 0.f;
    if (pA)
      red_pass<RRB, QB>(gu_loc, ldl, d.r, nvec, x + n * d.Cin * d.T, a_off, a_shift, d.T, t0, d.Cin * d.K, pA,
                        d.Cin * d.K, a_out);
    if (gu_out)
      for (int64_t j = 0; j < d.r; ++j)
        std::copy(gu_loc + j * ldl, gu_loc + j * ldl + len, gu_out + (n * d.r + j) * d.Tout + t0);
  }
  if (pB) {
    const float* un = u + n * d.r * d.Tout + t0;
    for (int64_t j = 0; j < d.r; ++j) {
      std::copy(un + j * d.Tout, un + j * d.Tout + len, u_loc + j * ldl);
      std::fill(u_loc + j * ldl + len, u_loc + j * ldl + padded, 0.f);
    }
    red_pass<RRB, QB>(u_loc, ldl, d.r, nvec, gn, b_off, b_shift, d.Tout, t0, d.Cout, pB, 1, b_out);
  }
}

// grad_x[n, :, t0:t1] += conv1dᵀ(g_u, A): Σ_j Σ_k A[j, c, k] · g_u[j, t + padl − k·dil], the forward's thin pass
// with g_u as the input (r rows) and Ag (Cin, r·K) = A with its taps reversed as the weight.
void gx_block(const float* gu, const float* Ag, float* gx, const rvclora_cpu_simd::Dims& d, int64_t n, int64_t t0,
              int64_t t1) {
  thin_pass<true>(gu + n * d.r * d.Tout, d.Tout, d.Tout, d.r, d.K, d.dil, d.padl - (d.K - 1) * d.dil, Ag, d.r * d.K,
                  d.Cin, gx + n * d.Cin * d.T + t0, d.T, t0, t1);
}

// The direct convolution (the `direct` plan of the Conv1d op): y[n, :, t0:t1] = Wm ⋆ x + bias and
// u[n, :, t0:t1] = A ⋆ x, tile by tile, so each tile of x is read from memory once for both (Wm, A:
// (rows, Cin·K) with (channel, tap) row-major; bias may be null).
void direct_fwd_block(const float* x, const float* Wm, const float* bias, const float* A, float* y, float* u,
                      const rvclora_cpu_simd::Dims& d, int64_t n, int64_t t0, int64_t t1) {
  constexpr int64_t step = NV * V::W;
  const float* xn = x + n * d.Cin * d.T;
  float* yn = y + n * d.Cout * d.Tout;
  float* un = u + n * d.r * d.Tout;
  for (int64_t t = t0; t < t1; t += step) {
    const int64_t te = std::min(t + step, t1);
    thin_pass(xn, d.T, d.T, d.Cin, d.K, d.dil, -d.padl, Wm, d.Cin * d.K, d.Cout, yn + t, d.Tout, t, te, bias);
    thin_pass(xn, d.T, d.T, d.Cin, d.K, d.dil, -d.padl, A, d.Cin * d.K, d.r, un + t, d.Tout, t, te);
  }
}

// The direct plan's input gradient: gx[n, :, t0:t1] = conv1dᵀ(g, Wm), the forward's microkernel over g with
// Wt (Cin, Cout·K) = Wm transposed with its taps reversed (as gx_block does for g_u and A).
void direct_gx_block(const float* g, const float* Wt, float* gx, const rvclora_cpu_simd::Dims& d, int64_t n,
                     int64_t t0, int64_t t1) {
  thin_pass(g + n * d.Cout * d.Tout, d.Tout, d.Tout, d.Cout, d.K, d.dil, d.padl - (d.K - 1) * d.dil, Wt, d.Cout * d.K,
            d.Cin, gx + n * d.Cin * d.T + t0, d.T, t0, t1);
}

// One block [t0, t1) of sample n of the ConvTranspose1d backward. gp: the phase-split g of sample n (rows
// of length Tp); coff/cshift: each (channel, tap) column's row offset and shift in it; Bs = s·B (r, Cout·K).
void convt_bwd_block(const float* gp, int64_t Tp, const int64_t* coff, const int64_t* cshift, int64_t lo, int64_t hi,
                     const float* x, const float* u, const float* Bs, const rvclora_cpu_simd::TDims& d, int64_t n,
                     int64_t t0, int64_t t1, float* gu_loc, float* u_loc, int64_t ldl, float* pA, float* pB,
                     float* gu_out, const int64_t* x_off, const int64_t* zero_shift, const int64_t* a_out,
                     const int64_t* b_out) {
  const int64_t len = t1 - t0, nvec = (len + V::W - 1) / V::W, padded = nvec * V::W;
  const int64_t ncol = d.Cout * d.K;
  if (pA || gu_out) {
    tab_pass(gp, coff, cshift, lo, hi, Tp, ncol, Bs, ncol, d.r, gu_loc, ldl, t0, t1);
    for (int64_t j = 0; j < d.r; ++j)
      for (int64_t i = len; i < padded; ++i) gu_loc[j * ldl + i] = 0.f;
    if (pA)
      red_pass<RRB, QB>(gu_loc, ldl, d.r, nvec, x + n * d.Cin * d.T, x_off, zero_shift, d.T, t0, d.Cin, pA, d.Cin,
                        a_out);
    if (gu_out)
      for (int64_t j = 0; j < d.r; ++j)
        std::copy(gu_loc + j * ldl, gu_loc + j * ldl + len, gu_out + (n * d.r + j) * d.T + t0);
  }
  if (pB) {
    const float* un = u + n * d.r * d.T + t0;
    for (int64_t j = 0; j < d.r; ++j) {
      std::copy(un + j * d.T, un + j * d.T + len, u_loc + j * ldl);
      std::fill(u_loc + j * ldl + len, u_loc + j * ldl + padded, 0.f);
    }
    red_pass<RRB, QB>(u_loc, ldl, d.r, nvec, gp, coff, cshift, Tp, t0, ncol, pB, ncol, b_out);
  }
}
