// The fused one-token decode step of a RetNet LM on CPU, and the weight-streaming product it is
// built from, registered as torch.ops.retnet.{decode_step, linear}. The step computes exactly
// what `RetNetLM.forward(ids [B, 1], mode="recurrent")` computes (retnet/modules/retention.py is
// the reference, in the same order of operations), with float32 activations whatever the weight
// format. Per layer: norm, the q/k/v/g products in one parallel region, rotation, one pass over
// the state that decays it, adds kᵀ[v, m] into the caller's output buffer and reads q·S' out,
// the head norm and gate, W_O, norm, the FFN's products in two regions, residuals.
#include "simd.h"  // first: it picks at::vec's back end

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <iterator>
#include <string>

#include "activations.h"
#include "head_norm.h"
#include "products.h"

namespace retnet {
namespace {

// The choices among architectures, coded as their position in the field tables below.
enum Norm : int64_t { kLayer = 0, kRms = 1 };
using HeadNorm = head_norm::Kind;  // kGroup, kRms, kNone (head_norm.h)
enum Ffn : int64_t { kGelu = 0, kGluGelu = 1, kGluSwish = 2 };

// The architecture as `decode_step` takes it: `ints` and `floats` in the order of these tables,
// defined here once. Each entry is (member, "config field name[=the choices' names in the
// order of the enum's codes]"). Python reads the names through torch.ops.retnet.decode_fields()
// and builds both lists by name (retnet/model/fast_decode.py): no side matches positions.
#define RETNET_INT_FIELDS(X)                                                               \
  X(L, "n_layers") X(H, "n_heads") X(K, "key_head_dim") X(V, "value_head_dim")             \
  X(D, "d_model") X(F, "ffn_dim") X(vocab, "vocab_size") X(norm, "norm=layer,rms")         \
  X(head_norm, "head_norm=group,rms,none") X(ffn, "ffn=gelu,glu-gelu,glu-swish")           \
  X(gated, "use_gate") X(glu, "glu")
#define RETNET_FLOAT_FIELDS(X) X(eps, "norm_eps") X(embed_scale, "embed_scale")
#define RETNET_MEMBER_INT(m, name) int64_t m;
#define RETNET_MEMBER_FLOAT(m, name) float m;
#define RETNET_NAME(m, name) name,

struct Dims {
  RETNET_INT_FIELDS(RETNET_MEMBER_INT)
  RETNET_FLOAT_FIELDS(RETNET_MEMBER_FLOAT)
};
constexpr const char* kIntFields[] = {RETNET_INT_FIELDS(RETNET_NAME)};
constexpr const char* kFloatFields[] = {RETNET_FLOAT_FIELDS(RETNET_NAME)};

WFormat format_of(const at::Tensor& w) {
  if (w.scalar_type() == at::kFloat) return WFormat::f32;
  if (w.scalar_type() == at::kBFloat16) return WFormat::bf16;
  TORCH_CHECK(w.scalar_type() == at::kChar, "weights must be float32, bfloat16 or int8");
  return WFormat::i8;
}

Matrix matrix(const at::Tensor& w, const at::Tensor& scale, float* y, int64_t ldy) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "weights must be contiguous [out, in]");
  const float* s = scale.numel() ? scale.data_ptr<float>() : nullptr;
  TORCH_CHECK(format_of(w) != WFormat::i8 || s, "an int8 weight needs its scales");
  return {w.data_ptr(), s, w.size(0), format_of(w), y, ldy};
}

// LayerNorm (with bias) or RMSNorm over D values, accumulated in double.
void norm(const float* x, float* out, int64_t D, int64_t kind, const float* w, const float* b,
          float eps) {
  double mean = 0, sq = 0;
  for (int64_t i = 0; i < D; ++i) mean += x[i];
  mean = kind == kLayer ? mean / D : 0.0;
  for (int64_t i = 0; i < D; ++i) sq += (x[i] - mean) * (x[i] - mean);
  float inv = static_cast<float>(1.0 / std::sqrt(sq / D + eps));
  for (int64_t i = 0; i < D; ++i) {
    float v = (x[i] - static_cast<float>(mean)) * inv * w[i];
    out[i] = b ? v + b[i] : v;
  }
}

const float* ptr(const at::Tensor& t) { return t.numel() ? t.data_ptr<float>() : nullptr; }

// What every layer needs from the positions, computed once per step (as the reference's
// Positions): the rotation's cos and sin [B, K/2] (angles formed in float32 like
// retnet/ops/rotary.py's, then the C library's cosf/sinf: within an ulp of ATen's, and plain
// loops here instead of four ATen calls that cost ~80 µs a step), γ^m and √c_n per (row,
// head) [B, H].
struct PositionTables {
  std::vector<float> cos, sin, decay, sqrt_c;
};

PositionTables position_tables(const std::vector<int64_t>& pos, const std::vector<float>& mask,
                               const at::Tensor& inv_freq, const float* log_decay, int64_t H) {
  const int64_t B = static_cast<int64_t>(pos.size()), half = inv_freq.numel();
  const float* theta = inv_freq.data_ptr<float>();
  PositionTables t{std::vector<float>(B * half), std::vector<float>(B * half),
                   std::vector<float>(B * H), std::vector<float>(B * H)};
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(pos[b]) * theta[i];
      t.cos[b * half + i] = std::cos(angle);
      t.sin[b * half + i] = std::sin(angle);
    }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      float lg = log_decay[h], p1 = static_cast<float>(pos[b] + 1);
      t.decay[b * H + h] = std::exp(mask[b] * lg);
      // c_n, the decay row sum at this position (retnet/ops/decay.py), in float32
      float c = lg == 0.f ? p1 : std::expm1(p1 * lg) / std::expm1(lg);
      t.sqrt_c[b * H + h] = std::sqrt(c);
    }
  return t;
}

// Rotate q and k of row b (interleaved pairs; retnet/ops/rotary.py), scale k by K^-1/2 and
// mask it. qk: [2, H, K] in place.
void rotate(float* qk, int64_t H, int64_t K, const PositionTables& t, int64_t b, float mask) {
  float scale = 1.f / std::sqrt(static_cast<float>(K));
  const float* cs = t.cos.data() + b * (K / 2);
  const float* sn = t.sin.data() + b * (K / 2);
  for (int64_t h = 0; h < 2 * H; ++h) {
    float* x = qk + h * K;
    float f = h >= H ? scale * mask : 1.f;
    for (int64_t i = 0; i < K / 2; ++i) {
      float x0 = x[2 * i], x1 = x[2 * i + 1];
      x[2 * i] = (x0 * cs[i] - x1 * sn[i]) * f;
      x[2 * i + 1] = (x1 * cs[i] + x0 * sn[i]) * f;
    }
  }
}

// Values before p's first whole-vector boundary (where simd::stream may start), at most n.
int64_t to_boundary(const float* p, int64_t n) {
  const auto mis = reinterpret_cast<uintptr_t>(p) % sizeof(simd::fvec);
  return std::min<int64_t>(n, (sizeof(simd::fvec) - mis) % sizeof(simd::fvec) / sizeof(float));
}

// out[j] = decay · s[j] + ki · v[j] and acc[j] += qi · out[j] for j < n. The new state is
// written through simd::stream from the first vector boundary on: it is not read again this
// step (AVX-512 streams it past the caches; see simd::stream for why AVX2 does not).
void state_row(const float* s, float* out, const float* v, float ki, float qi, float decay,
               int64_t n, float* acc) {
  using simd::fvec;
  int64_t j = 0;
  if (reinterpret_cast<uintptr_t>(out) % sizeof(float) == 0) {
    for (const int64_t head = to_boundary(out, n); j < head; ++j) {
      out[j] = decay * s[j] + ki * v[j];
      acc[j] += qi * out[j];
    }
    const fvec d(decay), kv(ki), qv(qi);
    for (; j + simd::kLanes <= n; j += simd::kLanes) {
      const fvec x = simd::fma(d, simd::load(s + j), kv * simd::load(v + j));
      simd::stream(out + j, x);
      simd::fma(qv, x, simd::load(acc + j)).store(acc + j);
    }
  }
  for (; j < n; ++j) {
    out[j] = decay * s[j] + ki * v[j];
    acc[j] += qi * out[j];
  }
}

// state_row for four rows at once, `stride` rows apart (a multiple of 16: rows of V + 1 floats
// 16 apart share their 64-byte alignment, so one loop streams all four): four streams per core
// keep more of the state's reads in flight than one, and v and acc are loaded once per four
// rows. The score-sum column V is left to the caller.
void state_row4(const float* S, float* out, const float* v, const float* k, const float* q,
                float decay, int64_t i0, int64_t stride, int64_t V, float* acc) {
  using simd::fvec;
  const int64_t W = V + 1;
  const float* s[4];
  float* o[4];
  float ki[4], qi[4];
  for (int r = 0; r < 4; ++r) {
    const int64_t i = i0 + r * stride;
    s[r] = S + i * W, o[r] = out + i * W, ki[r] = k[i], qi[r] = q[i];
  }
  auto scalar = [&](int64_t j) {
    for (int r = 0; r < 4; ++r) {
      o[r][j] = decay * s[r][j] + ki[r] * v[j];
      acc[j] += qi[r] * o[r][j];
    }
  };
  int64_t j = 0;
  if (reinterpret_cast<uintptr_t>(o[0]) % sizeof(float) == 0) {
    for (const int64_t head = to_boundary(o[0], V); j < head; ++j) scalar(j);
    const fvec d(decay);
    fvec kv[4], qv[4];
    for (int r = 0; r < 4; ++r) kv[r] = fvec(ki[r]), qv[r] = fvec(qi[r]);
    for (; j + simd::kLanes <= V; j += simd::kLanes) {
      const fvec vj = simd::load(v + j);
      fvec a = simd::load(acc + j);
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        const fvec x = simd::fma(d, simd::load(s[r] + j), kv[r] * vj);
        simd::stream(o[r] + j, x);
        a = simd::fma(qv[r], x, a);
      }
      a.store(acc + j);
    }
  }
  for (; j < V; ++j) scalar(j);
}

// One pass over rows [k0, k1) of one head's state [K, V+1]: S' = γ S + k_i [v, m] into `out`
// and acc += q_i S'_i (the read-out, V+1 values with the score sum last).
void state_rows(const float* S, float* out, const float* q, const float* k, const float* v,
                float mask, float decay, int64_t k0, int64_t k1, int64_t V, float* acc) {
  const int64_t W = V + 1;
  for (int64_t j = 0; j < W; ++j) acc[j] = 0.f;
  const int64_t quarter = (k1 - k0) / 4 / 16 * 16;  // rows in each of four streams
  for (int64_t i = k0; i < k0 + quarter; ++i) {
    state_row4(S, out, v, k, q, decay, i, quarter, V, acc);
    for (int64_t r = 0; r < 4; ++r) {  // the score-sum column of the four rows
      const int64_t at = (i + r * quarter) * W + V;
      out[at] = decay * S[at] + k[i + r * quarter] * mask;
      acc[V] += q[i + r * quarter] * out[at];
    }
  }
  for (int64_t i = k0 + 4 * quarter; i < k1; ++i) {
    const float* s = S + i * W;
    float* o = out + i * W;
    state_row(s, o, v, k[i], q[i], decay, V, acc);
    float n = decay * s[V] + k[i] * mask;
    o[V] = n;
    acc[V] += q[i] * n;
  }
  simd::stream_fence();  // the streaming stores are visible before the region's barrier
}

// Retention for all B rows of one layer: qkvg [B, 2HK + (1 + gated) HV] (q, k rotated in
// place), the state in → out, the gated and head-normalised output into o [B, H·V].
void retention(const Dims& d, float* qkvg, int64_t ld, const float* S, float* Sout,
               const PositionTables& pt, const float* mask, const float* gn_w,
               const float* gn_b, float* o, int64_t B) {
  const int64_t H = d.H, K = d.K, V = d.V, W = V + 1;
  for (int64_t b = 0; b < B; ++b) rotate(qkvg + b * ld, H, K, pt, b, mask[b]);
  for (int64_t b = 0; d.gated && b < B; ++b)  // the gate's columns of qkvg now hold silu(g)
    silu_inplace(qkvg + b * ld + 2 * H * K + H * V, H * V);
  // Split each head's K rows so both cores have work at batch 1; partial read-outs are summed.
  const int64_t threads = at::get_num_threads();
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(K / 8, (4 * threads + B * H - 1) /
                                                                      (B * H)));
  std::vector<float> partial(B * H * splits * W);
  // The read-out of (row, head) bh once its partial sums are in: / max(|score sum|, √c_n),
  // the head norm, the gate.
  std::vector<float> scratch(B * H * V);  // one allocation per layer, not per head
  auto finish = [&](int64_t bh) {
    int64_t b = bh / H, h = bh % H;
    float* acc = partial.data() + bh * splits * W;
    for (int64_t p = 1; p < splits; ++p)
      for (int64_t j = 0; j < W; ++j) acc[j] += acc[p * W + j];
    float* x = scratch.data() + bh * V;  // o / d of this (row, head)
    const float* gate = qkvg + b * ld + 2 * H * K + H * V + h * V;  // silu(g)
    head_norm::row(acc, acc[V], pt.sqrt_c[bh], d.head_norm,
                   gn_w ? gn_w + h * V : nullptr, gn_b ? gn_b + h * V : nullptr,
                   d.gated ? gate : nullptr, d.eps, V, x, o + b * H * V + h * V);
  };
  at::parallel_for(0, B * H * splits, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      int64_t bh = t / splits, part = t % splits, b = bh / H, h = bh % H;
      const float* row = qkvg + b * ld;
      float decay = pt.decay[bh];
      int64_t k0 = K * part / splits, k1 = K * (part + 1) / splits;
      state_rows(S + bh * K * W, Sout + bh * K * W, row + h * K, row + (H + h) * K,
                 row + 2 * H * K + h * V, mask[b], decay, k0, k1, V, partial.data() + t * W);
      if (splits == 1) finish(bh);  // whole heads: read out here, in parallel
    }
  });
  for (int64_t bh = 0; splits > 1 && bh < B * H; ++bh) finish(bh);
}

// Whether `sources` still are what `stamp` ([n, 2]: data pointer, version counter; see `stamp`
// below) recorded when the caller built its arguments from them. Checked here, inside the one
// call a step makes, because a separate check from Python cost ~0.15 ms a step: after a step
// has streamed the weights through the caches, every Python and dispatcher call starts cold.
bool current(at::TensorList sources, const at::Tensor& stamp) {
  const int64_t n = static_cast<int64_t>(sources.size());
  if (stamp.numel() != 2 * n || stamp.scalar_type() != at::kLong) return false;
  const int64_t* p = stamp.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    if (reinterpret_cast<int64_t>(sources[i].data_ptr()) != p[2 * i] ||
        static_cast<int64_t>(sources[i]._version()) != p[2 * i + 1])
      return false;
  return true;
}

// The state buffers the step reads and writes through raw pointers: each layer's in and out
// contiguous float32 [B, H, K, V+1], distinct (the new state is written while the old is read).
void check_states(at::TensorList kv_in, at::TensorList kv_out, int64_t B, int64_t H, int64_t K,
                  int64_t V) {
  for (size_t l = 0; l < kv_in.size(); ++l)
    for (const at::Tensor* t : {&kv_in[l], &kv_out[l]})
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 4 &&
                      t->size(0) == B && t->size(1) == H && t->size(2) == K &&
                      t->size(3) == V + 1 && kv_in[l].data_ptr() != kv_out[l].data_ptr(),
                  "decode_step: layer ", l, "'s state must be distinct contiguous float32 [",
                  B, ", ", H, ", ", K, ", ", V + 1, "] buffers in and out");
}

Dims dims_of(at::IntArrayRef ints, at::ArrayRef<double> floats) {
  TORCH_CHECK(ints.size() == std::size(kIntFields) && floats.size() == std::size(kFloatFields),
              "decode_step: ints/floats must follow torch.ops.retnet.decode_fields()");
  Dims d;
  size_t i = 0, j = 0;
#define RETNET_READ_INT(m, name) d.m = ints[i++];
#define RETNET_READ_FLOAT(m, name) d.m = static_cast<float>(floats[j++]);
  RETNET_INT_FIELDS(RETNET_READ_INT)
  RETNET_FLOAT_FIELDS(RETNET_READ_FLOAT)
  TORCH_CHECK(d.norm >= kLayer && d.norm <= kRms && d.head_norm >= head_norm::kGroup &&
                  d.head_norm <= head_norm::kNone && d.ffn >= kGelu && d.ffn <= kGluSwish,
              "decode_step: a choice's code is out of range");
  return d;
}

}  // namespace

// x [M, K] float32 times w [N, K] (float32, bf16 or int8 with scale [N]) → [M, N] float32.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be contiguous float32 [M, K]");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), "w must be [N, K]");
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  products(x.data_ptr<float>(), x.size(0), x.size(1), x.size(1),
           {matrix(w, scale, y.data_ptr<float>(), w.size(0))});
  return y;
}

// One token per row through the whole model. weights per layer: q, k, v, [g], o, up, [gate],
// down; then the LM head. scales: one per weight (empty unless int8). vectors per layer:
// norm1 w, b, group-norm w, b, norm2 w, b (empty where absent); then the final norm's w, b.
// kv_out receives the new state; offset_out the new offsets. Returns logits [B, vocab], or
// an empty tensor, having computed nothing, when `sources` no longer match `stamp` (the caller
// then rebuilds its arguments).
at::Tensor decode_step(const at::Tensor& ids, const at::Tensor& mask, const at::Tensor& offset,
                       at::Tensor offset_out, const at::Tensor& embed,
                       const at::Tensor& embed_scale, at::TensorList weights,
                       at::TensorList scales, at::TensorList vectors, at::TensorList kv_in,
                       at::TensorList kv_out, const at::Tensor& log_decay,
                       const at::Tensor& inv_freq, at::IntArrayRef ints,
                       at::ArrayRef<double> floats, at::TensorList sources,
                       const at::Tensor& stamp) {
  if (!current(sources, stamp)) return at::empty({0}, ids.options().dtype(at::kFloat));
  const Dims d = dims_of(ints, floats);
  const int64_t B = ids.size(0), H = d.H, HK = d.H * d.K, HV = d.H * d.V;
  const int64_t per_layer = 6 + d.gated + d.glu;  // q k v [g] o up [gate] down
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == d.L * per_layer + 1 &&
                  scales.size() == weights.size() &&
                  static_cast<int64_t>(vectors.size()) == d.L * 6 + 2 &&
                  static_cast<int64_t>(kv_in.size()) == d.L && kv_out.size() == kv_in.size(),
              "decode_step: tensor lists do not match the architecture");
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong && ids.is_contiguous() &&
                  offset.numel() == B && offset_out.numel() == B &&
                  offset.scalar_type() == at::kLong && offset_out.scalar_type() == at::kLong &&
                  offset.is_contiguous() && offset_out.is_contiguous(),
              "decode_step: ids and offsets must be contiguous int64 [B]");
  check_states(kv_in, kv_out, B, H, d.K, d.V);
  // 0. positions, offsets and the input embedding (int8 tables: one scale per row)
  std::vector<int64_t> pos(B);
  std::vector<float> m(B);
  const int64_t* ids_p = ids.data_ptr<int64_t>();
  const bool* mask_p = mask.numel() ? mask.data_ptr<bool>() : nullptr;  // empty: all real
  TORCH_CHECK(!mask_p || mask.numel() == B, "decode_step: mask must be empty or [B]");
  for (int64_t b = 0; b < B; ++b) {
    const int64_t real = mask_p ? mask_p[b] : 1;
    m[b] = static_cast<float>(real);
    pos[b] = std::max<int64_t>(offset.data_ptr<int64_t>()[b] + real - 1, 0);
    offset_out.data_ptr<int64_t>()[b] = offset.data_ptr<int64_t>()[b] + real;
  }
  const PositionTables pt = position_tables(pos, m, inv_freq, log_decay.data_ptr<float>(), H);
  const int64_t D = d.D, qkvg_w = 2 * HK + (1 + d.gated) * HV, ffn_w = (1 + d.glu) * d.F;
  std::vector<float> x(B * D), h(B * D), tmp(B * D), qkvg(B * qkvg_w), o(B * HV), f(B * ffn_w);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(ids_p[b] >= 0 && ids_p[b] < embed.size(0), "token id out of range");
    float s = d.embed_scale * (embed_scale.numel() ? embed_scale.data_ptr<float>()[ids_p[b]] : 1.f);
    for (int64_t i = 0; i < D; ++i) {
      int64_t at = ids_p[b] * D + i;
      float e = embed.scalar_type() == at::kFloat ? embed.data_ptr<float>()[at]
                : embed.scalar_type() == at::kBFloat16
                    ? static_cast<float>(embed.data_ptr<c10::BFloat16>()[at])
                    : static_cast<float>(embed.data_ptr<int8_t>()[at]);
      x[b * D + i] = e * s;
    }
  }
  auto residual = [&](float* into) {
    for (int64_t i = 0; i < B * D; ++i) into[i] += tmp[i];
  };
  for (int64_t l = 0; l < d.L; ++l) {
    const at::Tensor* W = weights.data() + l * per_layer;
    const at::Tensor* Sc = scales.data() + l * per_layer;
    const at::Tensor* vec = vectors.data() + l * 6;
    // 1. retention sublayer: y = x + W_O(gate ⊙ headnorm(retention(norm1(x))))
    for (int64_t b = 0; b < B; ++b)
      norm(&x[b * D], &h[b * D], D, d.norm, ptr(vec[0]), ptr(vec[1]), d.eps);
    std::vector<Matrix> in;
    int64_t col = 0;
    for (int64_t j = 0; j < 3 + d.gated; ++j) {
      in.push_back(matrix(W[j], Sc[j], qkvg.data() + col, qkvg_w));
      col += W[j].size(0);
    }
    products(h.data(), B, D, D, in);
    retention(d, qkvg.data(), qkvg_w, kv_in[l].data_ptr<float>(), kv_out[l].data_ptr<float>(),
              pt, m.data(), ptr(vec[2]), ptr(vec[3]), o.data(), B);
    int64_t j = 3 + d.gated;
    products(o.data(), B, HV, HV, {matrix(W[j], Sc[j], tmp.data(), D)});
    residual(x.data());
    // 2. FFN sublayer: x = y + down(act(up(norm2(y))) [⊙ gate(norm2(y))])
    for (int64_t b = 0; b < B; ++b)
      norm(&x[b * D], &h[b * D], D, d.norm, ptr(vec[4]), ptr(vec[5]), d.eps);
    std::vector<Matrix> up = {matrix(W[j + 1], Sc[j + 1], f.data(), ffn_w)};
    if (d.glu) up.push_back(matrix(W[j + 2], Sc[j + 2], f.data() + d.F, ffn_w));
    products(h.data(), B, D, D, up);
    for (int64_t b = 0; b < B; ++b)
      (d.ffn == kGluSwish ? silu_inplace : gelu_inplace)(f.data() + b * ffn_w, d.F);
    for (int64_t b = 0; d.glu && b < B; ++b) {
      float* fb = f.data() + b * ffn_w;
      for (int64_t i = 0; i < d.F; ++i) fb[i] *= fb[d.F + i];
    }
    int64_t down = j + 1 + 1 + d.glu;
    products(f.data(), B, ffn_w, d.F, {matrix(W[down], Sc[down], tmp.data(), D)});
    residual(x.data());
  }
  // 3. final norm and the LM head
  const at::Tensor* fin = vectors.data() + d.L * 6;
  for (int64_t b = 0; b < B; ++b)
    norm(&x[b * D], &h[b * D], D, d.norm, ptr(fin[0]), ptr(fin[1]), d.eps);
  auto logits = at::empty({B, d.vocab}, ids.options().dtype(at::kFloat));
  products(h.data(), B, D, D,
           {matrix(weights.back(), scales.back(), logits.data_ptr<float>(), d.vocab)});
  return logits;
}

// [n, 2] int64: each tensor's data pointer and version counter, in one call (what
// `fast_decode` compares to know that its cached plan still stands for a model's weights; in
// Python the same is two attribute reads per tensor, ~40 µs a step for the small preset).
at::Tensor stamp(at::TensorList tensors) {
  const int64_t n = static_cast<int64_t>(tensors.size());
  auto out = at::empty({n, 2}, at::TensorOptions().dtype(at::kLong));
  int64_t* p = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    p[2 * i] = reinterpret_cast<int64_t>(tensors[i].data_ptr());
    p[2 * i + 1] = static_cast<int64_t>(tensors[i]._version());
  }
  return out;
}

at::Tensor head_norm_gate(const at::Tensor& of, const at::Tensor& c, const at::Tensor& g,
                          const at::Tensor& w, const at::Tensor& b, double eps) {
  for (const at::Tensor* t : {&of, &c, &g, &w, &b})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(),
                "head_norm_gate takes contiguous float32 tensors");
  return head_norm::forward(of, c, g, w, b, eps);
}

std::vector<at::Tensor> head_norm_gate_backward(const at::Tensor& dout, const at::Tensor& of,
                                                const at::Tensor& c, const at::Tensor& g,
                                                const at::Tensor& w, const at::Tensor& b,
                                                double eps) {
  for (const at::Tensor* t : {&dout, &of, &c, &g, &w, &b})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(),
                "head_norm_gate_backward takes contiguous float32 tensors");
  return head_norm::backward(dout, of, c, g, w, b, eps);
}

// decode_step's architecture fields, "int:NAME[=CHOICES]" then "float:NAME", in order.
std::vector<std::string> decode_fields() {
  std::vector<std::string> out;
  for (const char* f : kIntFields) out.push_back(std::string("int:") + f);
  for (const char* f : kFloatFields) out.push_back(std::string("float:") + f);
  return out;
}

TORCH_LIBRARY(retnet, m) {
  m.def("decode_fields() -> str[]", &decode_fields);
  m.def("isa() -> str", []() -> std::string { return simd::kIsa; });  // the vector back end
  m.def("linear(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("stamp(Tensor[] tensors) -> Tensor", &stamp);  // any device: it reads no data
  m.def(
      "decode_step(Tensor ids, Tensor mask, Tensor offset, Tensor(a!) offset_out, Tensor embed, "
      "Tensor embed_scale, Tensor[] weights, Tensor[] scales, Tensor[] vectors, Tensor[] kv_in, "
      "Tensor(b!)[] kv_out, Tensor log_decay, Tensor inv_freq, int[] ints, float[] floats, "
      "Tensor[] sources, Tensor stamp) -> Tensor");
  m.def("head_norm_gate(Tensor of, Tensor c, Tensor g, Tensor w, Tensor b, float eps) -> Tensor");
  m.def(
      "head_norm_gate_backward(Tensor dout, Tensor of, Tensor c, Tensor g, Tensor w, Tensor b, "
      "float eps) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(retnet, CPU, m) {
  m.impl("linear", &linear);
  m.impl("decode_step", &decode_step);
  m.impl("head_norm_gate", &head_norm_gate);
  m.impl("head_norm_gate_backward", &head_norm_gate_backward);
}

}  // namespace retnet
