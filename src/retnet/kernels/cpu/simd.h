// The vector layer every CPU kernel here is written against: PyTorch's at::vec::Vectorized<float>
// (the layer ATen's own CPU kernels use: AVX-512, AVX2 and NEON back ends, and a plain-array
// default), picked at compile time from what the compiler flags enable (-march=native, or a
// variant build's; see kernels/build.py), plus the few pieces at::vec lacks or does slowly,
// each with its ISA-specific forms beside a portable one:
//
//   widen(int8*)          kLanes int8 weights → float32 (sign-extend in one instruction)
//   widen_pairs(bf16*)    2·kLanes bf16 weights → their even and odd halves as float32, by a
//                         shift and a mask in each 32-bit lane (no conversion instructions)
//   stream(p, v)          a store that skips the read-for-ownership (x86 non-temporal)
//   in_register(v)        keeps a value in a register (GCC would fold reloads into each FMA)
//   exp(v)                e^v in ~1 ulp (Cephes expf; ATen's exp_u20 allows 20 ulp)
//
// This file must be included before any other ATen header: it defines CPU_CAPABILITY, which
// selects the back end inside ATen/cpu/vec/vec.h.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define RETNET_X86 1
#define RETNET_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define RETNET_X86 1
#define RETNET_ISA "avx2"
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define CPU_CAPABILITY NEON  // vec.h takes its vec128 (NEON) back end on aarch64 by itself
#define RETNET_NEON 1
#define RETNET_ISA "neon"
#else
#define CPU_CAPABILITY DEFAULT
#define RETNET_ISA "scalar"  // at::vec's plain-array default: correct, not fast
#endif

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(RETNET_X86)
#include <immintrin.h>
#elif defined(RETNET_NEON)
#include <arm_neon.h>
#endif

namespace retnet::simd {

using fvec = at::vec::Vectorized<float>;
constexpr int kLanes = fvec::size();
// Vector registers, which bound how many accumulators a product keeps (x86-64 has 16 ymm
// registers, 32 zmm with AVX-512; aarch64 has 32 NEON registers).
#if defined(CPU_CAPABILITY_AVX512) || defined(RETNET_NEON)
constexpr int kRegisters = 32;
#else
constexpr int kRegisters = 16;
#endif
constexpr const char* kIsa = RETNET_ISA;

inline fvec load(const float* p) { return fvec::loadu(p); }
inline fvec load(const float* p, int64_t n) { return fvec::loadu(p, n); }  // zero past n
inline fvec fma(const fvec& a, const fvec& b, const fvec& c) { return at::vec::fmadd(a, b, c); }

inline float sum(const fvec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_ps(v);
#else
  float lanes[kLanes];
  v.store(lanes);
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += lanes[i];
  return s;
#endif
}

inline fvec in_register(fvec v) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 r = v;
  asm("" : "+v"(r));
  return r;
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 r = v;
  asm("" : "+x"(r));
  return r;
#elif defined(RETNET_NEON)
  float32x4_t r = v;
  asm("" : "+w"(r));
  return r;
#else
  return v;
#endif
}

// kLanes int8 values at p as float32.
inline fvec widen(const int8_t* p) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#elif defined(RETNET_NEON)
  int32_t four;
  std::memcpy(&four, p, 4);  // exactly kLanes = 4 bytes: never past the row's end
  const int16x8_t h = vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(four)));
  return vcvtq_f32_s32(vmovl_s16(vget_low_s16(h)));
#else
  float f[kLanes];
  for (int i = 0; i < kLanes; ++i) f[i] = p[i];
  return fvec::loadu(f);
#endif
}
inline fvec widen(const float* p) { return fvec::loadu(p); }

// The first n (< kLanes) values, zero past them: the tail of a row, once per row.
template <typename T>
inline fvec widen(const T* p, int64_t n) {
  float f[kLanes] = {};
  for (int64_t i = 0; i < n; ++i) f[i] = static_cast<float>(p[i]);
  return fvec::loadu(f);
}

// 2·kLanes bf16 values at p: the even-indexed ones as float32 (a bf16 is the high half of a
// float32: shift each 32-bit lane left by 16) and the odd ones (mask off the low half).
inline void widen_pairs(const c10::BFloat16* p, fvec& even, fvec& odd) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i raw = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(int(0xFFFF0000u))));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(int(0xFFFF0000u))));
#elif defined(RETNET_NEON)
  const uint32x4_t raw = vld1q_u32(reinterpret_cast<const uint32_t*>(p));
  even = vreinterpretq_f32_u32(vshlq_n_u32(raw, 16));
  odd = vreinterpretq_f32_u32(vandq_u32(raw, vdupq_n_u32(0xFFFF0000u)));
#else
  float e[kLanes], o[kLanes];
  for (int i = 0; i < kLanes; ++i) e[i] = p[2 * i], o[i] = p[2 * i + 1];
  even = fvec::loadu(e);
  odd = fvec::loadu(o);
#endif
}

// The first n (< 2·kLanes) values, zero past them.
inline void widen_pairs(const c10::BFloat16* p, int64_t n, fvec& even, fvec& odd) {
  c10::BFloat16 b[2 * kLanes];
  for (int i = 0; i < 2 * kLanes; ++i) b[i] = i < n ? p[i] : c10::BFloat16(0.f);
  widen_pairs(b, even, odd);
}

// Where `stream` may store: p aligned to a whole vector.
inline bool stream_aligned(const float* p) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(fvec) == 0;
}

// A store the step does not read back. AVX-512 builds stream it past the caches (no
// read-for-ownership: a third less of the state's traffic; chosen on the Intel Xeon). AVX2
// builds store it plainly: on the 2-core AMD EPYC (Zen 3, 32 MiB L3) plain stores made the
// whole one-token step 5-15% faster at batch 1 and 8 in every weight format (the state
// stayed partly cached for the next step's read): benchmarks/kernel_ab.py, results in
// docs/benchmarks.md, "Streaming or plain stores for the state".
inline void stream(float* p, const fvec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_ps(p, v);
#else
  v.store(p);
#endif
}

// The streamed stores are visible to other threads after this.
inline void stream_fence() {
#if defined(RETNET_X86)
  _mm_sfence();
#endif
}

inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }

// 2^n for integral n in [-126, 127], as float32 bits.
inline fvec pow2(const fvec& n) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
#elif defined(RETNET_NEON)
  return vreinterpretq_f32_s32(
      vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127)), 23));
#else
  float f[kLanes];
  n.store(f);
  for (int i = 0; i < kLanes; ++i) f[i] = std::ldexp(1.f, static_cast<int>(f[i]));
  return fvec::loadu(f);
#endif
}

// e^x: x = n·ln2 + r with |r| ≤ ln2/2, e^r by a degree-6 polynomial, times 2^n. x is clamped
// to [-87, 88] first (2^n stays a normal float).
inline fvec exp(fvec x) {
  x = at::vec::minimum(at::vec::maximum(x, fvec(-87.f)), fvec(88.f));
  const fvec n = (x * fvec(1.44269504088896341f)).round();
  fvec r = fma(n, fvec(-0.693359375f), x);  // ln2 in two parts
  r = fma(n, fvec(2.12194440e-4f), r);
  fvec p(1.9875691500e-4f);
  p = fma(p, r, fvec(1.3981999507e-3f));
  p = fma(p, r, fvec(8.3334519073e-3f));
  p = fma(p, r, fvec(4.1665795894e-2f));
  p = fma(p, r, fvec(1.6666665459e-1f));
  p = fma(p, r, fvec(5.0000001201e-1f));
  p = fma(p, r * r, r + fvec(1.f));
  return p * pow2(n);
}

// f over x[0, n) in place, kLanes at a time and the tail through a partial load and store.
template <typename F>
inline void map(float* x, int64_t n, F f) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) f(load(x + i)).store(x + i);
  if (i < n) f(load(x + i, n - i)).store(x + i, static_cast<int>(n - i));
}

}  // namespace retnet::simd
