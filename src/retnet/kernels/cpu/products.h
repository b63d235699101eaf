// Weight-streaming products for decoding: y[m, n] = scale[n] · Σ_k x[m, k] · W[n, k] for a few
// rows m (M ≤ 32 in decoding) and weights W [N, K] in float32, bf16 or int8 (row-major: the
// nn.Linear layout). A one-token step is bound by how fast the weights stream from memory, so
// each weight is read exactly once, widened to float32 in registers and multiplied into the rows
// of x, which stay in L1. The activations stay float32: bf16 and int8 are weight-only formats.
#pragma once

#include "simd.h"  // first: it picks at::vec's back end

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace retnet {

enum class WFormat : int { f32 = 0, bf16 = 1, i8 = 2 };

// One weight matrix of a fused product: N rows of K values; scale [N] for int8, else null.
// Its output row m is written at y + m * ldy.
struct Matrix {
  const void* w;
  const float* scale;
  int64_t rows;
  WFormat format;
  float* y;
  int64_t ldy;
};

// One weight row of a product, where its M outputs go (m-th at y + m · ldy), and its scale.
struct Row {
  const void* w;
  float* y;
  int64_t ldy;
  float scale;
};

// S weight rows read in lockstep, far apart (each stream walks its own quarter of the thread's
// share), so the hardware prefetcher follows S streams per core and keeps more misses in
// flight: benchmarks/gemv_streams.py measures this as fast as a plain read, where four
// adjacent rows (one stream, four loads apart) reach little more than half of it. Written once
// against simd.h (at::vec::Vectorized<float>: kLanes floats a vector).
using simd::fvec;
using simd::kLanes;

// With several passes of x rows over the same weight rows (M > MR), the passes after the first
// read L1 and would leave the memory system idle: the second pass fetches each stream's next
// row, which the next group's first pass then finds in L1. (Fetching from the first pass, two
// rows ahead, measured ~20% slower at M = 8 in float32: the second pass still idled memory.)
// Once per 64-byte line.
template <typename T>
inline void prefetch_ahead(const T* w, int64_t k, int64_t K) {
  if ((k * static_cast<int64_t>(sizeof(T))) % 64 == 0) simd::prefetch(w + k + K);
}

// Each accumulator summed into its output. Every loop over the accumulators is unrolled (here
// and in the kernels): an index the compiler cannot resolve keeps the whole array in memory,
// and GCC then stored every accumulator on every iteration.
template <int MR, int S>
inline void write_out(const fvec (&acc)[MR][S], const Row* row, int64_t m0) {
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s)
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
      row[s].y[(m0 + m) * row[s].ldy] = simd::sum(acc[m][s]) * row[s].scale;
}

// bf16 rows without a conversion pass: simd::widen_pairs splits 2·kLanes loaded bf16 values
// into the even and the odd ones as float32, and x is handed over permuted to match
// (`pair_order`: per 2·kLanes columns, the kLanes even then the kLanes odd). x's rows of the
// group are loaded first (2·MR registers), then each weight row is widened once and used MR
// times: MR·S accumulators + 2·MR + 2 registers.
template <int MR, int S, bool PF>
inline void lockstep_bf16(const float* x, int64_t ldx, int64_t K, const Row* row, int64_t m0) {
  constexpr int64_t P = 2 * kLanes;
  fvec acc[MR][S];
  const c10::BFloat16* w[S];
#pragma GCC unroll 8
  for (int s = 0; s < S; ++s) {
    w[s] = static_cast<const c10::BFloat16*>(row[s].w);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) acc[m][s] = fvec(0.f);
  }
  for (int64_t k = 0; k < K; k += P) {  // (a loop body, not a lambda: it must inline)
    const int64_t n = std::min(P, K - k);  // n < P: the row's last values; x is zero-padded
    fvec xe[MR], xo[MR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      xe[m] = simd::in_register(simd::load(x + m * ldx + k));
      xo[m] = simd::in_register(simd::load(x + m * ldx + k + kLanes));
    }
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) {
      if (PF) prefetch_ahead(w[s], k, K);
      fvec even, odd;
      if (n == P) simd::widen_pairs(w[s] + k, even, odd);
      else simd::widen_pairs(w[s] + k, n, even, odd);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m)
        acc[m][s] = simd::fma(xo[m], odd, simd::fma(xe[m], even, acc[m][s]));
    }
  }
  write_out<MR, S>(acc, row, m0);
}

// x [M, K] (ldx apart) in the column order lockstep_bf16 reads, zero-padded to whole blocks of
// 2·kLanes columns (Kp).
inline std::vector<float> pair_order(const float* x, int64_t M, int64_t ldx, int64_t K,
                                     int64_t Kp) {
  constexpr int64_t P = 2 * kLanes;
  std::vector<float> out(M * Kp, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t j = k % P;
      out[m * Kp + k - j + (j % 2 ? kLanes + j / 2 : j / 2)] = x[m * ldx + k];
    }
  return out;
}

// MR rows of x (from row m0) times S weight rows: MR × S accumulators. float32 and int8 rows
// are widened kLanes values at a time: the MR rows of x are loaded first, then each weight
// vector is widened and meets them, so MR·S + MR + 1 registers are live (loading all S weight
// vectors first spilled an accumulator with AVX2's 16 registers at S = 8).
template <typename T, int MR, int S, bool PF = false>
inline void lockstep(const float* x, int64_t ldx, int64_t K, const Row* row, int64_t m0) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    lockstep_bf16<MR, S, PF>(x, ldx, K, row, m0);
  } else {
    fvec acc[MR][S];
    const T* w[S];
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) {
      w[s] = static_cast<const T*>(row[s].w);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) acc[m][s] = fvec(0.f);
    }
    int64_t k = 0;
    for (; k + kLanes <= K; k += kLanes) {
      fvec xv[MR];
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) xv[m] = simd::in_register(simd::load(x + m * ldx + k));
#pragma GCC unroll 8
      for (int s = 0; s < S; ++s) {
        if (PF) prefetch_ahead(w[s], k, K);
        const fvec wv = simd::widen(w[s] + k);
#pragma GCC unroll 8
        for (int m = 0; m < MR; ++m) acc[m][s] = simd::fma(xv[m], wv, acc[m][s]);
      }
    }
    if (k < K) {  // the last K % kLanes columns, zero past the row's end
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const fvec xv = simd::load(x + m * ldx + k, K - k);
#pragma GCC unroll 8
        for (int s = 0; s < S; ++s)
          acc[m][s] = simd::fma(xv, simd::widen(w[s] + k, K - k), acc[m][s]);
      }
    }
    write_out<MR, S>(acc, row, m0);
  }
}

// All M rows of x times S weight rows, MR rows of x at a time (the weight rows stay in L1
// between them): half the vector registers hold accumulators (16 / S rows with AVX-512 or
// NEON, 8 / S with AVX2).
template <typename T, int S>
inline void group(const float* x, int64_t M, int64_t ldx, int64_t K, const Row* row) {
  constexpr int64_t MR = S >= 2 ? simd::kRegisters / 2 / S : simd::kRegisters / 4;
  int64_t m0 = 0;
  if (M >= 2 * MR) {  // the second of several passes fetches ahead
    lockstep<T, MR, S>(x, ldx, K, row, 0);
    lockstep<T, MR, S, true>(x + MR * ldx, ldx, K, row, MR);
    m0 = 2 * MR;
  }
  for (; m0 < M; m0 += MR) {
    const float* xm = x + m0 * ldx;
    switch (std::min<int64_t>(MR, M - m0)) {
      case 1: lockstep<T, 1, S>(xm, ldx, K, row, m0); break;
      case 2: lockstep<T, 2, S>(xm, ldx, K, row, m0); break;
      case 3: lockstep<T, 3 <= MR ? 3 : 1, S>(xm, ldx, K, row, m0); break;
      case 4: lockstep<T, 4 <= MR ? 4 : 1, S>(xm, ldx, K, row, m0); break;
      case 5: lockstep<T, 5 <= MR ? 5 : 1, S>(xm, ldx, K, row, m0); break;
      case 6: lockstep<T, 6 <= MR ? 6 : 1, S>(xm, ldx, K, row, m0); break;
      case 7: lockstep<T, 7 <= MR ? 7 : 1, S>(xm, ldx, K, row, m0); break;
      default: lockstep<T, MR, S>(xm, ldx, K, row, m0); break;
    }
  }
}

// Walks the rows of several matrices in order, from a global row index on.
class Cursor {
 public:
  Cursor(const std::vector<Matrix>& mats, const std::vector<int64_t>& first, int64_t g,
         int64_t K)
      : mats_(mats), K_(K) {
    i_ = std::upper_bound(first.begin(), first.end(), g) - first.begin() - 1;
    r_ = g - first[i_];
  }
  template <typename T>
  Row next() {
    while (r_ == mats_[i_].rows) ++i_, r_ = 0;
    const Matrix& m = mats_[i_];
    Row row{static_cast<const T*>(m.w) + r_ * K_, m.y + r_, m.ldy,
            m.scale ? m.scale[r_] : 1.f};
    ++r_;
    return row;
  }

 private:
  const std::vector<Matrix>& mats_;
  int64_t K_;
  size_t i_;
  int64_t r_;
};

constexpr int kStreams = 4;  // weight rows read in lockstep per core
// With one row of x there are registers for eight: float32 and int8 matrix-vector products
// ran 1% and 5-7% faster with eight streams per core (benchmarks/kernel_ab.py, Intel Xeon,
// 2 cores); bf16's even/odd halves would spill, so it keeps four.
constexpr int kStreamsOneRow = 8;

// Global rows [g0, g1) in S parts walked side by side, then the few left over.
template <typename T, int S = kStreams>
void share(const float* x, int64_t M, int64_t ldx, int64_t K, const std::vector<Matrix>& mats,
           const std::vector<int64_t>& first, int64_t g0, int64_t g1) {
  const int64_t q = (g1 - g0) / S;
  std::vector<Cursor> cursors;
  for (int s = 0; s < S; ++s) cursors.emplace_back(mats, first, g0 + s * q, K);
  Row row[S];
  for (int64_t j = 0; j < q; ++j) {
    for (int s = 0; s < S; ++s) row[s] = cursors[s].next<T>();
    group<T, S>(x, M, ldx, K, row);
  }
  Cursor rest(mats, first, g0 + S * q, K);
  for (int64_t g = g0 + S * q; g < g1; ++g) {
    row[0] = rest.next<T>();
    group<T, 1>(x, M, ldx, K, row);
  }
}

// Four weight rows in lockstep per core while the product is bound by memory; from 8 rows of x
// on it is bound by arithmetic, and two rows × 8 rows of x widen each weight once.
// Every matrix in `mats` (one weight format) times the same x [M, K] (ldx apart), in one
// parallel region: each thread streams one contiguous share of all their rows.
inline void products(const float* x, int64_t M, int64_t ldx, int64_t K,
                     const std::vector<Matrix>& mats) {
  std::vector<int64_t> first(mats.size() + 1, 0);  // first global row of each matrix
  for (size_t i = 0; i < mats.size(); ++i) {
    TORCH_CHECK(mats[i].format == mats[0].format, "products: one weight format per call");
    first[i + 1] = first[i] + mats[i].rows;
  }
  std::vector<float> paired;
  if (mats[0].format == WFormat::bf16) {
    const int64_t Kp = (K + 2 * kLanes - 1) / (2 * kLanes) * (2 * kLanes);
    paired = pair_order(x, M, ldx, K, Kp);
    x = paired.data();
    ldx = Kp;
  }
  const int64_t total = first.back(), threads = at::get_num_threads();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g0 = total * t / threads, g1 = total * (t + 1) / threads;
      switch (mats[0].format) {
        case WFormat::f32:
          if (M == 1) share<float, kStreamsOneRow>(x, M, ldx, K, mats, first, g0, g1);
          else share<float>(x, M, ldx, K, mats, first, g0, g1);
          break;
        case WFormat::bf16: share<c10::BFloat16>(x, M, ldx, K, mats, first, g0, g1); break;
        case WFormat::i8:
          if (M == 1) share<int8_t, kStreamsOneRow>(x, M, ldx, K, mats, first, g0, g1);
          else share<int8_t>(x, M, ldx, K, mats, first, g0, g1);
          break;
      }
    }
  });
}

}  // namespace retnet
