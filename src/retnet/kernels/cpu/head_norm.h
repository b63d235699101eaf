// The retention output's per-head normalisation and gate for training and prefill, forward
// and backward, one pass over each row:
//
//   x = o / max(|z|, c)        o = retention output [V], z = its score-sum column, c = floor
//   y = GroupNorm_head(x) · w + b
//   out = silu(g) ⊙ y
//
// Autograd runs this as ~8 ATen ops and keeps o, x, y and g (four [T, H·V] tensors per
// layer); the backward here recomputes x and y from o and g, so the training step keeps
// two. The PyTorch expression in modules/retention.py is the reference.
#pragma once

#include "simd.h"  // first: it picks at::vec's back end

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "activations.h"

namespace retnet {
namespace head_norm {

// σ(g) over a row into s (float32).
inline void sigmoid_row(const float* g, float* s, int64_t n) {
  int64_t i = 0;
  for (; i + simd::kLanes <= n; i += simd::kLanes) sigmoid(simd::load(g + i)).store(s + i);
  if (i < n) sigmoid(simd::load(g + i, n - i)).store(s + i, static_cast<int>(n - i));
}

// The per-head normalisation: GroupNorm with its affine (the paper's), RMS without one
// (torchscale's), or none (an ablation). Codes as decode_step's `head_norm` field lists them.
enum Kind : int64_t { kGroup = 0, kRms = 1, kNone = 2 };

struct Stats {
  float d, mean, rstd;
};

// One (row, head): x = o / d into x[V] with d = max(|z|, c), and the statistics of `kind`
// (mean 0 without centring, rstd 1 without normalising).
inline Stats normalise(const float* o, float z, float c, int64_t kind, float eps, int64_t V,
                       float* x) {
  const float d = std::max(std::fabs(z), c);
  const float inv = 1.f / d;
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < V; ++i) {
    x[i] = o[i] * inv;
    sum += x[i];
  }
  if (kind == kNone) return {d, 0.f, 1.f};
  const float mean = kind == kGroup ? sum / V : 0.f;
  float sq = 0.f;
#pragma omp simd reduction(+ : sq)
  for (int64_t i = 0; i < V; ++i) sq += (x[i] - mean) * (x[i] - mean);
  return {d, mean, 1.f / std::sqrt(sq / V + eps)};
}

// The output stage of one (row, head), for decoding and for training alike: out[V] =
// gate ⊙ norm(o / max(|z|, c)), where `gate` holds silu(g) (null: no gate) and the GroupNorm's
// affine is w, b [V]. x [V] is scratch.
inline Stats row(const float* o, float z, float c, int64_t kind, const float* w, const float* b,
                 const float* gate, float eps, int64_t V, float* x, float* out) {
  const Stats st = normalise(o, z, c, kind, eps, V, x);
  for (int64_t i = 0; i < V; ++i) {
    float y = (x[i] - st.mean) * st.rstd;
    if (kind == kGroup) y = y * w[i] + b[i];
    out[i] = gate ? gate[i] * y : y;
  }
  return st;
}

// of [..., H, V+1], c [..., H], g [..., H·V], w, b [H·V] → out [..., H·V] (R rows), GroupNorm
// and gate (the layers that train through this path; retnet.kernels.head_norm).
inline at::Tensor forward(const at::Tensor& of, const at::Tensor& c, const at::Tensor& g,
                          const at::Tensor& w, const at::Tensor& b, double eps) {
  const int64_t H = of.size(-2), V = of.size(-1) - 1, R = of.numel() / (H * (V + 1));
  auto out = at::empty_like(g);
  const float *po = of.data_ptr<float>(), *pc = c.data_ptr<float>(), *pg = g.data_ptr<float>();
  const float *pw = w.data_ptr<float>(), *pb = b.data_ptr<float>();
  float* py = out.data_ptr<float>();
  at::parallel_for(0, R * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> x(V), gate(V);
    for (int64_t rh = begin; rh < end; ++rh) {
      const int64_t h = rh % H;
      const float* o = po + rh * (V + 1);
      std::copy(pg + rh * V, pg + (rh + 1) * V, gate.begin());
      silu_inplace(gate.data(), V);
      row(o, o[V], pc[rh], kGroup, pw + h * V, pb + h * V, gate.data(),
          static_cast<float>(eps), V, x.data(), py + rh * V);
    }
  });
  return out;
}

// The gradients (of [R, H, V+1], g [R, H·V], w [H·V], b [H·V]) of forward's output given
// dout [R, H·V]; c takes none (it is a function of the positions only).
inline std::vector<at::Tensor> backward(const at::Tensor& dout, const at::Tensor& of,
                                        const at::Tensor& c, const at::Tensor& g,
                                        const at::Tensor& w, const at::Tensor& b, double eps) {
  const int64_t H = of.size(-2), V = of.size(-1) - 1, R = of.numel() / (H * (V + 1));
  auto dof = at::empty_like(of), dg = at::empty_like(g);
  // The rows in `parts` fixed shares, each with its own sums of dw and db, added up at the end
  // in a fixed order: deterministic whatever the threads.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), R * H));
  std::vector<float> acc(static_cast<size_t>(parts) * 2 * H * V, 0.f);
  const float *po = of.data_ptr<float>(), *pc = c.data_ptr<float>(), *pg = g.data_ptr<float>();
  const float *pw = w.data_ptr<float>(), *pb = b.data_ptr<float>();
  const float* pd = dout.data_ptr<float>();
  float *pdo = dof.data_ptr<float>(), *pdg = dg.data_ptr<float>();
  auto share = [&](int64_t part) {
    std::vector<float> x(V), s(V), dxh(V);
    float* dw = acc.data() + static_cast<size_t>(part) * 2 * H * V;
    float* db = dw + H * V;
    for (int64_t rh = R * H * part / parts; rh < R * H * (part + 1) / parts; ++rh) {
      const int64_t h = rh % H;
      const float* o = po + rh * (V + 1);
      const float z = o[V];
      const Stats st = normalise(o, z, pc[rh], kGroup, static_cast<float>(eps), V, x.data());
      const float *gr = pg + rh * V, *dr = pd + rh * V;
      sigmoid_row(gr, s.data(), V);
      const float *wr = pw + h * V, *br = pb + h * V;
      float *dgr = pdg + rh * V, *dwr = dw + h * V, *dbr = db + h * V;
      float m1 = 0.f, m2 = 0.f;
#pragma omp simd reduction(+ : m1, m2)
      for (int64_t i = 0; i < V; ++i) {
        const float xh = (x[i] - st.mean) * st.rstd;
        const float y = xh * wr[i] + br[i];
        // d silu(g) / dg = σ(g) (1 + g (1 − σ(g)))
        dgr[i] = dr[i] * y * s[i] * (1.f + gr[i] * (1.f - s[i]));
        const float dy = dr[i] * gr[i] * s[i];
        dwr[i] += dy * xh;
        dbr[i] += dy;
        dxh[i] = dy * wr[i];
        m1 += dxh[i];
        m2 += dxh[i] * xh;
      }
      m1 /= V;
      m2 /= V;
      float* dor = pdo + rh * (V + 1);
      const float inv = 1.f / st.d;
      float dd = 0.f;  // d loss / d d, through every x_i = o_i / d
#pragma omp simd reduction(+ : dd)
      for (int64_t i = 0; i < V; ++i) {
        const float xh = (x[i] - st.mean) * st.rstd;
        const float dx = st.rstd * (dxh[i] - m1 - xh * m2);
        dor[i] = dx * inv;
        dd -= dx * x[i] * inv;
      }
      // d = max(|z|, c): z takes the gradient where |z| wins (half of it on a tie, as
      // torch.maximum), times sign(z) for the absolute value
      const float az = std::fabs(z), cc = pc[rh];
      const float win = az > cc ? 1.f : (az == cc ? 0.5f : 0.f);
      dor[V] = dd * win * static_cast<float>((z > 0) - (z < 0));
    }
  };
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) share(part);
  });
  auto dw = at::zeros({H * V}, of.options()), db = at::zeros({H * V}, of.options());
  float *pdw = dw.data_ptr<float>(), *pdb = db.data_ptr<float>();
  for (int64_t t = 0; t < parts; ++t) {
    const float* a = acc.data() + static_cast<size_t>(t) * 2 * H * V;
    for (int64_t i = 0; i < H * V; ++i) {
      pdw[i] += a[i];
      pdb[i] += a[H * V + i];
    }
  }
  return {dof, dg, dw, db};
}

}  // namespace head_norm
}  // namespace retnet
