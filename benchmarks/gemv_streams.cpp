// Variants of a float32 matrix-vector product y = W x (W [N, K] row-major) and of a plain read,
// for benchmarks/gemv_streams.py: how many rows a core should read at once. Registered as
// torch.ops.gemv_streams.{gemv, read}.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {
// S rows in lockstep; the rows start `stride` rows apart.
template <int S>
void rows(const float* x, const float* w, int64_t K, int64_t stride, float* y) {
  __m512 acc[S];
  for (int s = 0; s < S; ++s) acc[s] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 xv = _mm512_loadu_ps(x + k);
    for (int s = 0; s < S; ++s)
      acc[s] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(w + s * stride * K + k), acc[s]);
  }
  for (int s = 0; s < S; ++s) y[s * stride] = _mm512_reduce_add_ps(acc[s]);
}

// variant 0: one row at a time; 1: four adjacent rows; 2: four rows a quarter of the thread's
// share apart (the kernel's order). K must be a multiple of 16, each share of rows of 4.
at::Tensor gemv(const at::Tensor& x, const at::Tensor& w, int64_t variant) {
  const int64_t N = w.size(0), K = w.size(1), T = at::get_num_threads();
  auto y = at::empty({N}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = N * t / T, n = N * (t + 1) / T - r0, q = n / 4;
      for (int64_t j = 0; j < q; ++j) {
        if (variant == 0)
          for (int64_t r = 0; r < 4; ++r) rows<1>(xp, wp + (r0 + 4 * j + r) * K, K, 1, yp + r0 + 4 * j + r);
        else if (variant == 1)
          rows<4>(xp, wp + (r0 + 4 * j) * K, K, 1, yp + r0 + 4 * j);
        else
          rows<4>(xp, wp + (r0 + j) * K, K, q, yp + r0 + j);
      }
    }
  });
  return y;
}

// The sum of a float32 buffer read as S streams per thread (S = 1 or 4): a read with no
// arithmetic to speak of, the fastest this core can pull the bytes in.
at::Tensor read_sum(const at::Tensor& buf, int64_t streams) {
  const int64_t n = buf.numel(), T = at::get_num_threads();
  const float* p = buf.data_ptr<float>();
  std::vector<float> part(T, 0.f);
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t len = (n / T / streams) / 64 * 64;
      const float* base = p + t * (n / T);
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                       _mm512_setzero_ps()};
      for (int64_t i = 0; i < len; i += 16)
        for (int64_t s = 0; s < streams; ++s)
          acc[s] = _mm512_add_ps(acc[s], _mm512_loadu_ps(base + s * len + i));
      part[t] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]),
                                                   _mm512_add_ps(acc[2], acc[3])));
    }
  });
  float total = 0.f;
  for (float v : part) total += v;
  return at::tensor(total);
}
}  // namespace

TORCH_LIBRARY(gemv_streams, m) {
  m.def("gemv(Tensor x, Tensor w, int variant) -> Tensor");
  m.def("read(Tensor buf, int streams) -> Tensor");
}
TORCH_LIBRARY_IMPL(gemv_streams, CPU, m) {
  m.impl("gemv", &gemv);
  m.impl("read", &read_sum);
}
