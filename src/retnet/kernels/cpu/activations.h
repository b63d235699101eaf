// SiLU, exact (erf) GELU and the logistic sigmoid over float32 rows, in place, for the decode
// step and the output stage. ATen's at::silu_ / at::gelu_ cost 5-15 µs a call in dispatch and
// oneDNN set-up whatever the size (GELU goes through a oneDNN primitive), about 0.2 ms of a 2 ms
// int8 step over 16 calls; these loops cost a few hundred nanoseconds a row. exp is simd::exp
// (Cephes expf, ~1 ulp); erf is Abramowitz-Stegun 7.1.26 (absolute error below 1.5e-7).
#pragma once

#include "simd.h"

namespace retnet {

inline simd::fvec silu(const simd::fvec& x) {
  return x / (simd::fvec(1.f) + simd::exp(simd::fvec(0.f) - x));
}

inline simd::fvec sigmoid(const simd::fvec& x) {
  const simd::fvec one(1.f);
  return one / (one + simd::exp(simd::fvec(0.f) - x));
}

// 0.5 x (1 + erf(x / √2)), erf(z) = sign(z) (1 - t·P(t) e^{-z²}), t = 1 / (1 + p|z|).
inline simd::fvec gelu(const simd::fvec& x) {
  using simd::fma;
  using simd::fvec;
  const fvec z = x * fvec(0.70710678118654752f), az = z.abs(), one(1.f);
  const fvec t = one / fma(fvec(0.3275911f), az, one);
  fvec p(1.061405429f);
  p = fma(p, t, fvec(-1.453152027f));
  p = fma(p, t, fvec(1.421413741f));
  p = fma(p, t, fvec(-0.284496736f));
  p = fma(p, t, fvec(0.254829592f));
  const fvec e = simd::exp(fvec(0.f) - az * az);
  const fvec erf = one - p * t * e;  // erf(|z|)
  const fvec sign_erf = fvec::blendv(erf, fvec(0.f) - erf, z < fvec(0.f));
  return fvec(0.5f) * x * (one + sign_erf);
}

// (lambdas, not function pointers: each map is compiled with its function inlined)
inline void silu_inplace(float* x, int64_t n) {
  simd::map(x, n, [](const simd::fvec& v) { return silu(v); });
}
inline void gelu_inplace(float* x, int64_t n) {
  simd::map(x, n, [](const simd::fvec& v) { return gelu(v); });
}

}  // namespace retnet
