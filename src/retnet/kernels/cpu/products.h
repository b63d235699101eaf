// Weight-streaming products for decoding: y[m, n] = scale[n] · Σ_k x[m, k] · W[n, k] for a few
// rows m (M ≤ 32 in decoding) and weights W [N, K] in float32, bf16 or int8 (row-major: the
// nn.Linear layout). A one-token step is bound by how fast the weights stream from memory, so
// each weight is read exactly once: a block of NR weight rows is loaded (and widened to float32)
// once per 16 columns and multiplied into MR rows of x that stay in L1. The activations stay
// float32: bf16 and int8 are weight-only formats.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define RETNET_AVX512 1
#endif

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

#ifdef RETNET_AVX512
#ifndef RETNET_PREFETCH
#define RETNET_PREFETCH 4096
#endif
constexpr int64_t kPrefetch = RETNET_PREFETCH;  // bytes ahead of each weight row's reads
inline __m512 widen(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 widen(const c10::BFloat16* p) {
  // bf16 is the high half of a float32: zero-extend to 32 bits and shift into place.
  __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}
inline __m512 widen(const int8_t* p) {
  return _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 widen(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 widen(const c10::BFloat16* p, __mmask16 m) {
  __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}
inline __m512 widen(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

// MR rows of x times NR rows of W (nr ≤ NR of them real; the others repeat row 0 and are
// not stored). 16 accumulators at most, so everything lives in registers.
template <typename T, int MR, int NR>
inline void block(const float* x, int64_t ldx, const T* w, int64_t K, int nr, float* y,
                  int64_t ldy, const float* scale) {
  __m512 acc[MR][NR];
  const T* row[NR];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) {
    row[r] = w + (r < nr ? r : 0) * K;
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) acc[m][r] = _mm512_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(row[r] + k) + kPrefetch, _MM_HINT_T0);
      wv[r] = widen(row[r] + k);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  if (k < K) {  // the last K % 16 columns, through masked loads
    __mmask16 mask = static_cast<__mmask16>((1u << (K - k)) - 1);
    __m512 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = widen(row[r] + k, mask);
    for (int m = 0; m < MR; ++m) {
      __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * ldx + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < nr; ++r) {
      float s = _mm512_reduce_add_ps(acc[m][r]);
      y[m * ldy + r] = scale ? s * scale[r] : s;
    }
}

// All M rows of x against nr ≤ 4 rows of W: blocks of 8 rows × 2 weight rows, then 4 × 4, … .
template <typename T>
inline void rows(const float* x, int64_t M, int64_t ldx, const T* w, int64_t K, int nr,
                 float* y, int64_t ldy, const float* scale) {
  int64_t m = 0;
  for (; m + 8 <= M; m += 8)
    for (int r = 0; r < nr; r += 2)
      block<T, 8, 2>(x + m * ldx, ldx, w + r * K, K, std::min(2, nr - r), y + m * ldy + r, ldy,
                     scale ? scale + r : nullptr);
  const float* xm = x + m * ldx;
  float* ym = y + m * ldy;
  switch (M - m) {
    case 0: break;
    case 1: block<T, 1, 4>(xm, ldx, w, K, nr, ym, ldy, scale); break;
    case 2: block<T, 2, 4>(xm, ldx, w, K, nr, ym, ldy, scale); break;
    case 3: block<T, 3, 4>(xm, ldx, w, K, nr, ym, ldy, scale); break;
    case 4: block<T, 4, 4>(xm, ldx, w, K, nr, ym, ldy, scale); break;
    default:  // 5 to 7 rows: four, then the rest
      block<T, 4, 4>(xm, ldx, w, K, nr, ym, ldy, scale);
      rows(xm + 4 * ldx, M - m - 4, ldx, w, K, nr, ym + 4 * ldy, ldy, scale);
  }
}
#else
// Portable fallback (no AVX-512 at build time): plain loops the compiler vectorises.
template <typename T>
inline void rows(const float* x, int64_t M, int64_t ldx, const T* w, int64_t K, int nr,
                 float* y, int64_t ldy, const float* scale) {
  for (int r = 0; r < nr; ++r)
    for (int64_t m = 0; m < M; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[m * ldx + k] * static_cast<float>(w[r * K + k]);
      y[m * ldy + r] = scale ? s * scale[r] : s;
    }
}
#endif

constexpr int kRowBlock = 4;  // weight rows per unit of work

// Every matrix in `mats` times the same x [M, K] (ldx apart), in one parallel region over all
// their rows: each thread streams one contiguous share of the weights.
inline void products(const float* x, int64_t M, int64_t ldx, int64_t K,
                     const std::vector<Matrix>& mats) {
  std::vector<int64_t> first(mats.size() + 1, 0);  // first block of each matrix
  for (size_t i = 0; i < mats.size(); ++i)
    first[i + 1] = first[i] + (mats[i].rows + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, first.back(), 1, [&](int64_t begin, int64_t end) {
    size_t i = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
    for (int64_t b = begin; b < end; ++b) {
      while (b >= first[i + 1]) ++i;
      const Matrix& mat = mats[i];
      int64_t r0 = (b - first[i]) * kRowBlock;
      int nr = static_cast<int>(std::min<int64_t>(kRowBlock, mat.rows - r0));
      const float* scale = mat.scale ? mat.scale + r0 : nullptr;
      float* y = mat.y + r0;
      switch (mat.format) {
        case WFormat::f32:
          rows(x, M, ldx, static_cast<const float*>(mat.w) + r0 * K, K, nr, y, mat.ldy, scale);
          break;
        case WFormat::bf16:
          rows(x, M, ldx, static_cast<const c10::BFloat16*>(mat.w) + r0 * K, K, nr, y, mat.ldy,
               scale);
          break;
        case WFormat::i8:
          rows(x, M, ldx, static_cast<const int8_t*>(mat.w) + r0 * K, K, nr, y, mat.ldy, scale);
          break;
      }
    }
  });
}

}  // namespace retnet
