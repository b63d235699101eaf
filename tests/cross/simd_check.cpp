// Every function of the CPU kernels' vector layer (src/retnet/kernels/cpu/simd.h), the
// activations and the weight-streaming products against plain scalar loops, on the back end the
// compiler flags select. It links without libtorch (the few c10 / ATen functions the headers
// call are defined at the end of this file), so it also runs cross-compiled for aarch64 under
// qemu: tests/kernels/test_kernels_cross.py builds and runs it for NEON, AVX2 and the plain back end.
// Prints "isa=<back end> lanes=<kLanes>", then one line per mismatch; exits 1 on any.
#include "simd.h"  // first: it picks at::vec's back end

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "activations.h"
#include "products.h"

#if defined(__aarch64__)
static_assert(RETNET_NEON && retnet::simd::kLanes == 4, "aarch64 must take the NEON back end");
#endif

namespace {

using retnet::simd::fvec;
using retnet::simd::kLanes;
namespace simd = retnet::simd;

int checks = 0, failures = 0;

// One comparison; the first few mismatches of a run are printed.
bool expect(bool ok, const char* what, int64_t i, double got, double want) {
  ++checks;
  if (!ok && ++failures <= 20)
    std::printf("FAIL %s [%lld]: got %.9g, want %.9g\n", what, static_cast<long long>(i), got,
                want);
  return ok;
}
void expect_eq(const char* what, int64_t i, float got, float want) {
  expect(got == want || (std::isnan(got) && std::isnan(want)), what, i, got, want);
}
void expect_near(const char* what, int64_t i, double got, double want, double atol,
                 double rtol) {
  expect(std::fabs(got - want) <= atol + rtol * std::fabs(want), what, i, got, want);
}

std::vector<float> lanes(const fvec& v) {
  std::vector<float> out(kLanes);
  v.store(out.data());
  return out;
}

std::mt19937 rng(1234);
float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }

void check_load_fma_sum() {
  float a[kLanes], b[kLanes], c[kLanes];
  for (int i = 0; i < kLanes; ++i) a[i] = uniform(-4, 4), b[i] = uniform(-4, 4), c[i] = i - 2.5f;
  const auto la = lanes(simd::load(a)), f = lanes(simd::fma(simd::load(a), simd::load(b),
                                                            simd::load(c)));
  const auto r = lanes(simd::in_register(simd::load(b)));
  double s = 0;
  for (int i = 0; i < kLanes; ++i) {
    expect_eq("load", i, la[i], a[i]);
    expect_eq("in_register", i, r[i], b[i]);
    expect_near("fma", i, f[i], double(a[i]) * b[i] + c[i], 1e-6, 1e-6);
    s += a[i];
  }
  expect_near("sum", 0, simd::sum(simd::load(a)), s, 1e-6, 1e-6);
  for (int n = 0; n < kLanes; ++n) {  // a partial load reads n values, zero past them
    const auto t = lanes(simd::load(a, n));
    for (int i = 0; i < kLanes; ++i) expect_eq("load tail", n * 100 + i, t[i], i < n ? a[i] : 0);
  }
}

void check_widen() {
  int8_t q[256 + kLanes];
  for (int i = 0; i < 256 + kLanes; ++i) q[i] = static_cast<int8_t>(i - 128);
  for (int k = 0; k + kLanes <= 256 + kLanes; k += kLanes) {  // every int8 value
    const auto w = lanes(simd::widen(q + k));
    for (int i = 0; i < kLanes; ++i) expect_eq("widen int8", k + i, w[i], q[k + i]);
  }
  float f[kLanes];
  for (int i = 0; i < kLanes; ++i) f[i] = uniform(-1, 1);
  const auto wf = lanes(simd::widen(f));
  for (int i = 0; i < kLanes; ++i) expect_eq("widen float", i, wf[i], f[i]);
  for (int n = 0; n < kLanes; ++n) {
    const auto t8 = lanes(simd::widen(q + 3, n)), tf = lanes(simd::widen(f, n));
    for (int i = 0; i < kLanes; ++i) {
      expect_eq("widen int8 tail", n * 100 + i, t8[i], i < n ? q[3 + i] : 0);
      expect_eq("widen float tail", n * 100 + i, tf[i], i < n ? f[i] : 0);
    }
  }
}

void check_widen_pairs() {
  c10::BFloat16 b[2 * kLanes];
  for (int i = 0; i < 2 * kLanes; ++i) b[i] = c10::BFloat16(uniform(-100, 100));
  fvec even, odd;
  simd::widen_pairs(b, even, odd);
  auto e = lanes(even), o = lanes(odd);
  for (int i = 0; i < kLanes; ++i) {
    expect_eq("widen_pairs even", i, e[i], static_cast<float>(b[2 * i]));
    expect_eq("widen_pairs odd", i, o[i], static_cast<float>(b[2 * i + 1]));
  }
  for (int n = 0; n < 2 * kLanes; ++n) {  // the first n values, zero past them
    simd::widen_pairs(b, n, even, odd);
    e = lanes(even), o = lanes(odd);
    for (int i = 0; i < kLanes; ++i) {
      expect_eq("widen_pairs tail even", n * 100 + i, e[i], 2 * i < n ? float(b[2 * i]) : 0);
      expect_eq("widen_pairs tail odd", n * 100 + i, o[i],
                2 * i + 1 < n ? float(b[2 * i + 1]) : 0);
    }
  }
}

void check_stream() {
  alignas(64) float out[2 * kLanes];
  float in[kLanes];
  for (int i = 0; i < kLanes; ++i) in[i] = uniform(-1, 1);
  expect(simd::stream_aligned(out) && !simd::stream_aligned(out + 1), "stream_aligned", 0, 0, 0);
  simd::prefetch(in);
  simd::stream(out, simd::load(in));
  simd::stream_fence();
  for (int i = 0; i < kLanes; ++i) expect_eq("stream", i, out[i], in[i]);
}

// Error in units of the last place of the float nearest the exact value.
double ulps(float got, double exact) {
  const float e = static_cast<float>(exact);
  return std::fabs(got - exact) / (std::nextafter(std::fabs(e), INFINITY) - std::fabs(e));
}

void check_pow2_exp() {
  for (int n = -126; n <= 127; n += kLanes) {
    float x[kLanes];
    for (int i = 0; i < kLanes; ++i) x[i] = static_cast<float>(std::min(n + i, 127));
    const auto p = lanes(simd::pow2(simd::load(x)));
    for (int i = 0; i < kLanes; ++i) expect_eq("pow2", n + i, p[i], std::ldexp(1.f, int(x[i])));
  }
  // [-100, 100] in steps of 1/64 plus a few points, clamped to [-87, 88] as simd::exp does
  std::vector<float> x = {-87.f, 88.f, 0.f, -0.f, 1e-30f, -1e-30f};
  for (int i = -6400; i <= 6400; ++i) x.push_back(i / 64.f + 1.f / 1024);
  for (size_t k = 0; k + kLanes <= x.size(); k += kLanes) {
    const auto e = lanes(simd::exp(simd::load(x.data() + k)));
    for (int i = 0; i < kLanes; ++i) {
      const double exact = std::exp(std::fmin(std::fmax(double(x[k + i]), -87.0), 88.0));
      expect(ulps(e[i], exact) <= 2, "exp (ulps)", k + i, e[i], exact);
    }
  }
}

double silu_ref(double x) { return x / (1 + std::exp(-x)); }
double sigmoid_ref(double x) { return 1 / (1 + std::exp(-x)); }
double gelu_ref(double x) { return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))); }

void check_activations() {
  for (int k = -20 * 64; k + kLanes <= 20 * 64; k += kLanes) {  // x in [-20, 20)
    float x[kLanes];
    for (int i = 0; i < kLanes; ++i) x[i] = (k + i) / 64.f + 1.f / 512;
    const auto s = lanes(retnet::silu(simd::load(x))), g = lanes(retnet::gelu(simd::load(x)));
    const auto sg = lanes(retnet::sigmoid(simd::load(x)));
    for (int i = 0; i < kLanes; ++i) {
      expect_near("silu", k + i, s[i], silu_ref(x[i]), 1e-6, 2e-6);
      expect_near("sigmoid", k + i, sg[i], sigmoid_ref(x[i]), 1e-7, 2e-6);
      expect_near("gelu", k + i, g[i], gelu_ref(x[i]), 1e-6, 2e-6);
    }
  }
}

// map and the in-place activations over every length up to 3·kLanes + 1: the tail through a
// partial load and store, and nothing written past the end.
void check_map() {
  for (int n = 0; n <= 3 * kLanes + 1; ++n) {
    std::vector<float> x(n + 1);
    for (int i = 0; i <= n; ++i) x[i] = uniform(-6, 6);
    std::vector<float> m = x, s = x, g = x;
    simd::map(m.data(), n, [](const fvec& v) { return simd::fma(v, fvec(2.f), fvec(1.f)); });
    retnet::silu_inplace(s.data(), n);
    retnet::gelu_inplace(g.data(), n);
    for (int i = 0; i < n; ++i) {
      expect_near("map", n * 100 + i, m[i], 2.0 * x[i] + 1, 1e-6, 1e-6);
      expect_near("silu_inplace", n * 100 + i, s[i], silu_ref(x[i]), 1e-6, 2e-6);
      expect_near("gelu_inplace", n * 100 + i, g[i], gelu_ref(x[i]), 1e-6, 2e-6);
    }
    expect(m[n] == x[n] && s[n] == x[n] && g[n] == x[n], "map wrote past n", n, m[n], x[n]);
  }
}

// y [M, 2N] = x [M, K] times two weight matrices [N, K] in one call (the first writes columns
// [0, N) of each row, the second, scaled where int8, [N, 2N)), against float64 dot products of
// the same weights; x's rows are K + 3 apart.
template <typename T>
void check_products(retnet::WFormat format, int64_t M, int64_t K, int64_t N) {
  std::vector<float> x(M * (K + 3)), scale(N);
  std::vector<T> w0(N * K), w1(N * K);
  for (auto& v : x) v = uniform(-1, 1);
  for (auto& v : scale) v = uniform(0.5f, 2);
  for (int64_t i = 0; i < N * K; ++i) {
    if constexpr (std::is_same_v<T, int8_t>) {
      w0[i] = static_cast<int8_t>(rng() % 255 - 127);
      w1[i] = static_cast<int8_t>(rng() % 255 - 127);
    } else {
      w0[i] = T(uniform(-1, 1)), w1[i] = T(uniform(-1, 1));
    }
  }
  std::vector<float> y(M * 2 * N, NAN);
  const float* s1 = format == retnet::WFormat::i8 ? scale.data() : nullptr;
  retnet::products(x.data(), M, K + 3, K,
                   {{w0.data(), nullptr, N, format, y.data(), 2 * N},
                    {w1.data(), s1, N, format, y.data() + N, 2 * N}});
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < 2 * N; ++n) {
      const T* w = (n < N ? w0.data() : w1.data()) + (n % N) * K;
      double dot = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        dot += double(x[m * (K + 3) + k]) * double(static_cast<float>(w[k]));
        mag += std::fabs(double(x[m * (K + 3) + k]) * double(static_cast<float>(w[k])));
      }
      const double sc = n >= N && s1 ? s1[n % N] : 1.0;
      char what[64];
      std::snprintf(what, sizeof what, "products fmt=%d M=%lld K=%lld", int(format),
                    static_cast<long long>(M), static_cast<long long>(K));
      // float32 accumulation in any order: within (K + kLanes) roundings of the magnitudes
      const double tol = (K + kLanes) * 6e-8 * mag * sc;
      expect_near(what, m * 1000 + n, y[m * 2 * N + n], dot * sc, tol, 0);
    }
}

int threads = 1;  // what at::get_num_threads() answers: products() splits its rows this many ways

void check_all_products() {
  for (int t : {1, 3}) {
    threads = t;
    for (int64_t M : {1, 2, 3, 5, 9, 17})
      for (int64_t K : {int64_t(1), int64_t(kLanes - 1), int64_t(2 * kLanes + 3), int64_t(64)}) {
        check_products<float>(retnet::WFormat::f32, M, K, 13);
        check_products<c10::BFloat16>(retnet::WFormat::bf16, M, K, 13);
        check_products<int8_t>(retnet::WFormat::i8, M, K, 13);
      }
  }
}

}  // namespace

int main() {
  std::printf("isa=%s lanes=%d\n", simd::kIsa, kLanes);
  check_load_fma_sum();
  check_widen();
  check_widen_pairs();
  check_stream();
  check_pow2_exp();
  check_activations();
  check_map();
  check_all_products();
  if (failures) {
    std::printf("FAILED: %d of %d checks\n", failures, checks);
    return 1;
  }
  std::printf("ok: %d checks\n", checks);
  return 0;
}

// The c10 / ATen functions the headers call, which libtorch would provide: products() runs its
// shares one after another on this thread (or on OpenMP's, where at::parallel_for uses them).
namespace c10 {
bool ParallelGuard::is_enabled() { return true; }
ParallelGuard::ParallelGuard(bool) : previous_state_(false) {}
ParallelGuard::~ParallelGuard() = default;
namespace detail {
[[noreturn]] void torchCheckFail(const char* func, const char* file, uint32_t line,
                                 const char* msg) {
  std::fprintf(stderr, "TORCH_CHECK failed in %s (%s:%u): %s\n", func, file, line, msg);
  std::exit(2);
}
[[noreturn]] void torchCheckFail(const char* func, const char* file, uint32_t line,
                                 const std::string& msg) {
  torchCheckFail(func, file, line, msg.c_str());
}
}  // namespace detail
}  // namespace c10

namespace at {
void init_num_threads() {}
int get_num_threads() { return threads; }
int get_thread_num() { return 0; }
bool in_parallel_region() { return false; }
namespace internal {
void set_thread_num(int) {}
}  // namespace internal
}  // namespace at
