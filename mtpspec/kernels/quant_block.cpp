// The decoder blocks of a quantized target in one call, for decode and verify steps (fp32 rows).
//
// The per-op path (models/layers.py) runs ~25 torch ops per block; for a 135M model decoding one
// token they cost more than the block's arithmetic. `QuantStack` holds every block's weights
// (checked once) and `run` applies all blocks to a step's rows, each block row by row:
//
//   x = norm(h);  q, k, v = split(qkv(x))           [q/k norms per head];  rotate q, k (RoPE)
//   cache[slot] = k, v;   a = attention(q, cache)    (attention.cpp's batch-invariant kernel)
//   o = o_proj(a)   [o = out_norm(o)];   h = h + o
//   x = norm(h);  g, u = split(gate_up(x));  m = down(act(g) * u)   [m = mlp_out_norm(m)];  h = h + m
//
// with the quantized GEMM of quant_gemm.cpp. Every step treats each row on its own, so a token's
// output does not depend on the step's other tokens or rows (verify steps reproduce decode steps).
// RMS norms sum squares in fp64 and scale in fp32: y = x * (1 / sqrt(mean(x^2) + eps)) * (w + offset).
//
// run(h, cos, sin, lo, hi, mask, k, v, slots): h [M, D] (M = B * T rows, row b*T + t); per
// attention type (a block's `type` indexes these lists): cos / sin [B, T, ROT] (RoPE tables at the
// rows' positions, ROT <= head dim, rotate-half), the key range [lo, hi) of the cache that
// attention reads and an additive mask [B, 1, T, hi - lo] or an empty tensor (every key visible);
// per block: its cache k / v [B, KVH, capacity, HD] (unit stride in HD); slots [B, T]: where each
// row's K/V go.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

void quant_gemm_f32(const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t N, int64_t K, int fmt, int B,
                    int sm, float* y, const float* bias);
void quant_row_f32(const uint8_t* wp, int64_t K, int fmt, int B, int sm, int64_t n, float* out);
int64_t quant_packed_bytes(int64_t N, int64_t K, int fmt, int B, int sm);
bool quant_weight_ok(const torch::Tensor& packed, const std::vector<int64_t>& meta, int64_t want_n, int64_t want_k);
void exp_nonpositive_raw(float* s, int64_t n);
void attend_rows_raw(const float* qp, int64_t qsb, int64_t qsh, int64_t qst, const float* kp, int64_t ksb,
                     int64_t ksh, int64_t ksl, const float* vp, int64_t vsb, int64_t vsh, int64_t vsl,
                     const float* mp, int64_t msb, int64_t mst, int64_t msl, int64_t B, int64_t H, int64_t T,
                     int64_t D, int64_t KVH, int64_t L, float sc, float* op, int64_t osb, int64_t osh, int64_t ost);

extern bool g_attn_portable;  // attention.cpp: tests force the portable paths

namespace {

struct QW {  // one packed quantized weight (kernels/quant.py's QuantLinear)
  const uint8_t* w;
  int64_t N, K;
  int fmt, block, sm;  // bits, inputs per block, scale mode (quant_gemm.cpp)
  const float* bias;
};

const float* opt_ptr(const torch::Tensor& t) { return t.defined() && t.numel() ? t.data_ptr<float>() : nullptr; }

void gemm(const QW& q, const float* x, int64_t M, float* y) {
  quant_gemm_f32(x, q.K, M, q.w, q.N, q.K, q.fmt, q.block, q.sm, y, q.bias);
}

bool use_avx2() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok && !g_attn_portable;
}

// sum of x[i]^2 in fp64 in a fixed order, the same bits in both paths: value i goes to lane i % 8
// (in order of i), then ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)). A float's square is exact
// in fp64, so fused multiply-adds change nothing. (One running sum was a 4-cycle chain per value:
// ~1 us per 576-value norm, ~60 us of a decode step's 2 x 30 norms per row.)
inline double sum_squares_portable(const float* x, int64_t n) {
  double l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) l[i % 8] += double(x[i]) * double(x[i]);
  return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

__attribute__((target("avx2,fma"))) double sum_squares_avx2(const float* x, int64_t n) {
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();  // lanes 0-3, 4-7
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256d a = _mm256_cvtps_pd(_mm_loadu_ps(x + i)), b = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 4));
    lo = _mm256_add_pd(lo, _mm256_mul_pd(a, a));
    hi = _mm256_add_pd(hi, _mm256_mul_pd(b, b));
  }
  alignas(32) double l[8];
  _mm256_store_pd(l, lo);
  _mm256_store_pd(l + 4, hi);
  for (; i < n; ++i) l[i % 8] += double(x[i]) * double(x[i]);
  return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

// y = x * (1 / sqrt(mean(x^2) + eps)) * (w + offset) over n values (in place allowed)
inline void norm(const float* x, const float* w, float eps, float offset, int64_t n, float* y) {
  const double ss = use_avx2() ? sum_squares_avx2(x, n) : sum_squares_portable(x, n);
  const float inv = 1.0f / std::sqrt(float(ss / double(n)) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * inv * (w[i] + offset);
}

// rotate-half RoPE of one head vector (first rot dims), in place (two branch-free loops, which the
// compiler vectorizes)
inline void rope(float* x, const float* c, const float* s, int64_t rot) {
  const int64_t half = rot / 2;
  float tmp[1024];
  for (int64_t d = 0; d < rot; ++d) tmp[d] = x[d];
  for (int64_t d = 0; d < half; ++d) x[d] = tmp[d] * c[d] + -tmp[d + half] * s[d];
  for (int64_t d = half; d < rot; ++d) x[d] = tmp[d] * c[d] + tmp[d - half] * s[d];
}

// The first index of the largest of n values (torch.argmax's choice: the first NaN if there is one)
int64_t argmax_portable(const float* row, int64_t n) {
  int64_t arg = 0;
  float mx = row[0];
  for (int64_t j = 1; j < n && !std::isnan(mx); ++j)
    if (row[j] > mx || std::isnan(row[j])) mx = row[j], arg = j;
  return arg;
}

// The same, vectorized: the largest value (no NaN seen), then its first index. max_ps may keep
// either of +0 / -0, which compare equal, so the index is the first of them either way, as above.
__attribute__((target("avx2,fma"))) int64_t argmax_avx2(const float* row, int64_t n) {
  if (n < 16) return argmax_portable(row, n);
  __m256 m0 = _mm256_loadu_ps(row), m1 = m0, nan = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 a = _mm256_loadu_ps(row + j), b = _mm256_loadu_ps(row + j + 8);
    nan = _mm256_or_ps(nan, _mm256_or_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q), _mm256_cmp_ps(b, b, _CMP_UNORD_Q)));
    m0 = _mm256_max_ps(m0, a), m1 = _mm256_max_ps(m1, b);
  }
  if (_mm256_movemask_ps(nan)) return argmax_portable(row, n);
  alignas(32) float l[16];
  _mm256_store_ps(l, m0);
  _mm256_store_ps(l + 8, m1);
  float mx = l[0];
  for (int i = 1; i < 16; ++i) mx = l[i] > mx ? l[i] : mx;
  for (int64_t t = j; t < n; ++t) {
    if (std::isnan(row[t])) return t;  // no NaN before j
    mx = row[t] > mx ? row[t] : mx;
  }
  const __m256 want = _mm256_set1_ps(mx);
  for (int64_t t = 0; t + 8 <= n; t += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + t), want, _CMP_EQ_OQ));
    if (hit) return t + __builtin_ctz(hit);
  }
  for (int64_t t = n / 8 * 8; t < n; ++t)
    if (row[t] == mx) return t;
  return 0;  // not reached
}

int64_t argmax(const float* row, int64_t n) { return use_avx2() ? argmax_avx2(row, n) : argmax_portable(row, n); }

// a[i] = act(g[i]) * u[i] for the gated MLP (gu = [g | u], I values each), with exp of values <= 0
// only (exp_nonpositive_raw: vectorized, the same bits in every path; std::exp per value cost
// ~6 us per layer, 5% of a decode step):
//   silu(x) = x / (1 + e)  (x >= 0),  x e / (1 + e)  (x < 0),       e = exp(-|x|)
//   gelu_tanh(x) = x / 2 (1 + tanh(y)),  tanh(y) = sign(y) (1 - e) / (1 + e),  e = exp(-2|y|),
//   y = sqrt(2 / pi) (x + 0.044715 x^3)
void glu(const float* gu, int64_t I, bool gelu, float* e, float* a) {
  const float* g = gu;
  const float* u = gu + I;
  constexpr float c = 0.7978845608028654f;  // sqrt(2 / pi)
  if (gelu) {
    for (int64_t i = 0; i < I; ++i) {  // y is kept in a until the second pass
      a[i] = c * (g[i] + 0.044715f * g[i] * g[i] * g[i]);
      e[i] = -2.0f * std::fabs(a[i]);
    }
  } else {
    for (int64_t i = 0; i < I; ++i) e[i] = -std::fabs(g[i]);
  }
  exp_nonpositive_raw(e, I);
  if (gelu) {
    for (int64_t i = 0; i < I; ++i) {
      const float t = (1.0f - e[i]) / (1.0f + e[i]);
      a[i] = 0.5f * g[i] * (1.0f + (a[i] < 0.f ? -t : t)) * u[i];
    }
  } else {
    for (int64_t i = 0; i < I; ++i) {  // f = 1 (x >= 0) or e (x < 0), as a max (e <= 1): no branch
      const float pos = float(g[i] >= 0.f), f = e[i] > pos ? e[i] : pos;
      a[i] = g[i] * f / (1.0f + e[i]) * u[i];
    }
  }
}

// fn(r0, r1) over rows [0, M) of `width` values each: split across threads when there are enough
// values to pay for it (a 1-row decode step stays on the calling thread). Rows are independent,
// so the split does not change any result.
template <typename F>
void for_rows(int64_t M, int64_t width, const F& fn) {
  constexpr int64_t kMinValues = 8192;
  if (M * width < 2 * kMinValues)
    fn(int64_t(0), M);
  else
    at::parallel_for(0, M, std::max<int64_t>(1, kMinValues / std::max<int64_t>(width, 1)), fn);
}

}  // namespace


namespace {

struct Block {  // one decoder block's weights, checked when the stack is built
  QW w[4];
  const float *n_attn, *n_mlp, *n_q, *n_k, *n_ao, *n_mo;
  int64_t D, NH, KVH, HD, QS, KS, I;
  int type;
};

struct TypeStep {  // one attention type's tables for a step, checked once per run
  const float *cos, *sin, *mask;
  int64_t cs0, cs1, ss0, ss1, ms0, ms2, ms3, rot, lo, hi;
};

struct Scratch {
  std::vector<float> x, qkv, att, o, gu, act, ex;
};

void block_forward(const Block& bl, const float* hp, float* hn, int64_t B, int64_t T, const TypeStep& ts,
                   const torch::Tensor& kc, const torch::Tensor& vc, const int64_t* sp, float eps, float offset,
                   float scale, bool gelu, Scratch& sc) {
  const int64_t M = B * T, D = bl.D, NH = bl.NH, KVH = bl.KVH, HD = bl.HD, QS = bl.QS, KS = bl.KS, I = bl.I;
  const int64_t NQKV = bl.w[0].N;
  float *x = sc.x.data(), *qkv = sc.qkv.data(), *att = sc.att.data(), *o = sc.o.data(), *gu = sc.gu.data(),
        *act = sc.act.data(), *ex = sc.ex.data();
  // attention
  for_rows(M, D, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) norm(hp + r * D, bl.n_attn, eps, offset, D, x + r * D);
  });
  gemm(bl.w[0], x, M, qkv);
  float* kp = kc.data_ptr<float>();
  float* vp = vc.data_ptr<float>();
  const int64_t k0 = kc.stride(0), k1 = kc.stride(1), k2 = kc.stride(2);
  const int64_t v0 = vc.stride(0), v1 = vc.stride(1), v2 = vc.stride(2);
  for_rows(M, NQKV, [&](int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / T, t = r % T;
    const float* c = ts.cos + b * ts.cs0 + t * ts.cs1;
    const float* s = ts.sin + b * ts.ss0 + t * ts.ss1;
    float* row = qkv + r * NQKV;
    for (int64_t hh = 0; hh < NH + KVH; ++hh) {
      float* x1 = row + hh * HD;
      const float* nw = hh < NH ? bl.n_q : bl.n_k;
      if (nw) norm(x1, nw, eps, offset, HD, x1);
      rope(x1, c, s, ts.rot);
    }
    const int64_t slot = sp[r];
    for (int64_t g = 0; g < KVH; ++g) {
      std::memcpy(kp + b * k0 + g * k1 + slot * k2, row + QS + g * HD, HD * sizeof(float));
      std::memcpy(vp + b * v0 + g * v1 + slot * v2, row + QS + KS + g * HD, HD * sizeof(float));
    }
  }
  });
  attend_rows_raw(qkv, T * NQKV, HD, NQKV, kp + ts.lo * k2, k0, k1, k2, vp + ts.lo * v2, v0, v1, v2, ts.mask, ts.ms0,
                  ts.ms2, ts.ms3, B, NH, T, HD, KVH, ts.hi - ts.lo, scale, att, T * QS, HD, QS);
  gemm(bl.w[1], att, M, o);
  for_rows(M, 2 * D, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* orow = o + r * D;
      if (bl.n_ao) norm(orow, bl.n_ao, eps, offset, D, orow);
      for (int64_t i = 0; i < D; ++i) hn[r * D + i] = hp[r * D + i] + orow[i];
      norm(hn + r * D, bl.n_mlp, eps, offset, D, x + r * D);  // the MLP's input
    }
  });
  // MLP
  gemm(bl.w[2], x, M, gu);
  for_rows(M, 4 * I, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      glu(gu + r * 2 * I, I, gelu, ex + r * I, act + r * I);
    }
  });
  gemm(bl.w[3], act, M, o);
  for_rows(M, D, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* orow = o + r * D;
      if (bl.n_mo) norm(orow, bl.n_mo, eps, offset, D, orow);
      for (int64_t i = 0; i < D; ++i) hn[r * D + i] += orow[i];
    }
  });
}

}  // namespace

class QuantStack {
 public:
  // Per block: packed (qkv, o, gate_up, down; uint8), shapes (N, K, bits, block, scale mode of each), biases
  // (4, empty = none), norms (attention, MLP, q, k, attention out, MLP out; fp32, empty = none),
  // attention type index, query and K/V heads.
  QuantStack(const std::vector<std::vector<torch::Tensor>>& packed, const std::vector<std::vector<int64_t>>& shapes,
             const std::vector<std::vector<torch::Tensor>>& biases, const std::vector<std::vector<torch::Tensor>>& norms,
             const std::vector<int64_t>& types, const std::vector<int64_t>& n_heads,
             const std::vector<int64_t>& n_kv_heads, int64_t head_dim, double eps, double offset, double scale,
             bool gelu)
      : eps_(float(eps)), offset_(float(offset)), scale_(float(scale)), gelu_(gelu) {
    const size_t n = packed.size();
    TORCH_CHECK(shapes.size() == n && biases.size() == n && norms.size() == n && types.size() == n &&
                n_heads.size() == n && n_kv_heads.size() == n && n > 0, "QuantStack: one entry per block");
    for (size_t li = 0; li < n; ++li) {
      TORCH_CHECK(packed[li].size() == 4 && shapes[li].size() == 20 && biases[li].size() == 4 && norms[li].size() == 6,
                  "QuantStack: 4 weights (qkv, o, gate_up, down) with 5 shape values each, 4 biases, 6 norms per block");
      Block bl;
      for (int i = 0; i < 4; ++i) {
        const auto& p = packed[li][i];
        const auto* sh = &shapes[li][5 * i];
        TORCH_CHECK(p.scalar_type() == torch::kUInt8 && p.is_contiguous() && p.device().is_cpu(),
                    "QuantStack: packed weights must be contiguous uint8 CPU tensors");
        TORCH_CHECK((sh[2] == 4 && sh[3] == 32) || (sh[2] == 8 && (sh[3] == 16 || sh[3] == 32)),
                    "QuantStack: unsupported weight format");
        TORCH_CHECK(sh[4] >= 0 && sh[4] <= 2, "QuantStack: scale mode");
        const int64_t qbytes = sh[2] == 8 ? sh[3] * 16 : sh[3] * 8;
        const int64_t sbytes = sh[4] == 0 ? 128 : sh[4] == 1 ? 64 : 32;
        TORCH_CHECK(sh[1] % sh[3] == 0 && p.numel() == (sh[0] + 15) / 16 * (sh[1] / sh[3]) * (qbytes + sbytes),
                    "QuantStack: packed size does not match its shape");
        const auto& bias = biases[li][i];
        TORCH_CHECK(!bias.defined() || bias.numel() == 0 || (bias.numel() == sh[0] && bias.is_contiguous() &&
                    bias.scalar_type() == torch::kFloat32), "QuantStack: bias must be fp32 [N]");
        bl.w[i] = QW{p.data_ptr<uint8_t>(), sh[0], sh[1], int(sh[2]), int(sh[3]), int(sh[4]), opt_ptr(bias)};
        keep_.push_back(p);
        keep_.push_back(bias);
      }
      bl.NH = n_heads[li], bl.KVH = n_kv_heads[li], bl.HD = head_dim, bl.D = bl.w[0].K;
      bl.QS = bl.NH * bl.HD, bl.KS = bl.KVH * bl.HD, bl.I = bl.w[2].N / 2;
      TORCH_CHECK(bl.NH % bl.KVH == 0 && bl.HD % 8 == 0 && bl.HD <= 1024, "QuantStack: heads / head dim");
      TORCH_CHECK(bl.w[0].N == bl.QS + 2 * bl.KS && bl.w[1].K == bl.QS && bl.w[1].N == bl.D && bl.w[2].K == bl.D &&
                  bl.w[2].N == 2 * bl.I && bl.w[3].K == bl.I && bl.w[3].N == bl.D,
                  "QuantStack: weight shapes do not fit the block");
      for (int i = 0; i < 6; ++i) {
        const auto& t = norms[li][i];
        const int64_t want = (i == 2 || i == 3) ? bl.HD : bl.D;
        TORCH_CHECK(!t.defined() || t.numel() == 0 || (t.numel() == want && t.is_contiguous() &&
                    t.scalar_type() == torch::kFloat32), "QuantStack: norm weight ", i, " size");
        keep_.push_back(t);
      }
      bl.n_attn = opt_ptr(norms[li][0]), bl.n_mlp = opt_ptr(norms[li][1]), bl.n_q = opt_ptr(norms[li][2]);
      bl.n_k = opt_ptr(norms[li][3]), bl.n_ao = opt_ptr(norms[li][4]), bl.n_mo = opt_ptr(norms[li][5]);
      TORCH_CHECK(bl.n_attn && bl.n_mlp, "QuantStack: the attention and MLP norms are required");
      TORCH_CHECK(li == 0 || bl.D == blocks_[0].D, "QuantStack: every block must have the same width");
      bl.type = int(types[li]);
      TORCH_CHECK(bl.type >= 0, "QuantStack: attention type index");
      blocks_.push_back(bl);
    }
  }

  torch::Tensor run(const torch::Tensor& h, const std::vector<torch::Tensor>& cos, const std::vector<torch::Tensor>& sin,
                    const std::vector<int64_t>& lo, const std::vector<int64_t>& hi, const std::vector<torch::Tensor>& mask,
                    const std::vector<torch::Tensor>& k, const std::vector<torch::Tensor>& v,
                    const torch::Tensor& slots) const {
    const int64_t D = blocks_[0].D;
    TORCH_CHECK(h.dim() == 2 && h.size(1) == D && h.is_contiguous() && h.scalar_type() == torch::kFloat32,
                "QuantStack.run: h must be contiguous fp32 [M, hidden]");
    TORCH_CHECK(slots.dim() == 2 && slots.scalar_type() == torch::kLong && slots.is_contiguous(),
                "QuantStack.run: slots [B, T] int64");
    const int64_t B = slots.size(0), T = slots.size(1), M = h.size(0);
    TORCH_CHECK(M == B * T, "QuantStack.run: h must hold B * T rows");
    const size_t nt = cos.size();
    TORCH_CHECK(sin.size() == nt && lo.size() == nt && hi.size() == nt && mask.size() == nt,
                "QuantStack.run: per attention type cos, sin, lo, hi, mask");
    std::vector<TypeStep> ts(nt);
    for (size_t i = 0; i < nt; ++i) {
      const auto &c = cos[i], &s = sin[i];
      TORCH_CHECK(c.dim() == 3 && c.size(0) == B && c.size(1) == T && s.sizes() == c.sizes() && c.stride(2) == 1 &&
                  s.stride(2) == 1 && c.scalar_type() == torch::kFloat32 && s.scalar_type() == torch::kFloat32 &&
                  c.size(2) % 2 == 0, "QuantStack.run: cos / sin fp32 [B, T, rotary dims]");
      ts[i] = type_step(c.data_ptr<float>(), s.data_ptr<float>(), c.stride(0), c.stride(1), s.stride(0), s.stride(1),
                        c.size(2), lo[i], hi[i], mask[i], B, T);
    }
    auto a = torch::empty_like(h), b = torch::empty_like(h);
    forward_blocks(h.data_ptr<float>(), a.data_ptr<float>(), b.data_ptr<float>(), B, T, ts, k, v,
                   slots.data_ptr<int64_t>());
    return blocks_.size() % 2 ? a : b;
  }

  // What step() needs besides the blocks: the token embedding (a packed quantized table, `embed_meta`
  // = its N, K, bits, block, scale mode, as the tied LM head; or a dense fp32 [V, hidden] table,
  // embed_meta empty) and its scale, the final norm's weight (the blocks' eps and offset), the
  // packed LM head (head_meta as embed_meta) and each attention type's sliding window (0 = none).
  void set_io(const torch::Tensor& embed, const std::vector<int64_t>& embed_meta, double embed_scale,
              const torch::Tensor& final_norm, const torch::Tensor& head, const std::vector<int64_t>& head_meta,
              const std::vector<int64_t>& windows) {
    const int64_t D = blocks_[0].D;
    if (embed_meta.empty()) {
      TORCH_CHECK(embed.dim() == 2 && embed.size(1) == D && embed.is_contiguous() &&
                  embed.scalar_type() == torch::kFloat32, "QuantStack.set_io: dense embedding must be fp32 [V, hidden]");
    } else {
      TORCH_CHECK(quant_weight_ok(embed, embed_meta, -1, D), "QuantStack.set_io: packed embedding does not match its shape");
    }
    TORCH_CHECK(quant_weight_ok(head, head_meta, -1, D), "QuantStack.set_io: packed LM head does not match its shape");
    TORCH_CHECK(final_norm.numel() == D && final_norm.is_contiguous() && final_norm.scalar_type() == torch::kFloat32,
                "QuantStack.set_io: final norm weight fp32 [hidden]");
    int max_type = 0;
    for (const Block& bl : blocks_) max_type = std::max(max_type, bl.type);
    TORCH_CHECK(int64_t(windows.size()) > max_type, "QuantStack.set_io: one window per attention type");
    io_ = true;
    embed_ = embed, embed_meta_ = embed_meta, embed_scale_ = float(embed_scale);
    final_norm_ = final_norm, head_ = head, head_meta_ = head_meta, windows_ = windows;
  }

  // The cache step() writes to and reads from when it is given none: every block's k / v [rows,
  // KVH, capacity, HD] (steps use its first B rows). Passing the same 2 x blocks tensors to every
  // step costs more than the step's other Python work.
  // Empty lists unbind (the stack then holds no reference to the cache).
  void bind_cache(const std::vector<torch::Tensor>& k, const std::vector<torch::Tensor>& v) {
    TORCH_CHECK((k.empty() && v.empty()) || (k.size() == blocks_.size() && v.size() == blocks_.size()),
                "QuantStack.bind_cache: one k, v per block");
    bound_k_ = k, bound_v_ = v;
  }

  // A whole decode / verify step of B rows x T new tokens in one call: embeddings, every block, the
  // final norm and the LM head; then lengths += T. tokens [B, T]; lengths [B] (each row's cached
  // tokens: new token t of row b goes to cache slot lengths[b] + t); depth [B, T] (a draft tree:
  // position lengths[b] + depth[b, t]) or empty (position = slot). Per attention type: RoPE tables
  // cos / sin [N, rotary dims] indexed by position, and either lo / hi / mask (a tree: as run()
  // takes them) or all empty, for the key range and causal (sliding-window) mask step() then works
  // out. k / v: the caches, or empty for the bound ones (bind_cache). logits_rows: the rows (b * T +
  // t) to compute logits for, or empty for all. Returns {logits [R, V], final hidden [B * T, hidden],
  // argmax of each logits row [R]}.
  std::vector<torch::Tensor> step(const torch::Tensor& tokens, const torch::Tensor& lengths, const torch::Tensor& depth,
                                  const std::vector<torch::Tensor>& cos, const std::vector<torch::Tensor>& sin,
                                  const std::vector<int64_t>& lo_in, const std::vector<int64_t>& hi_in,
                                  const std::vector<torch::Tensor>& mask_in, const std::vector<torch::Tensor>& k,
                                  const std::vector<torch::Tensor>& v, const torch::Tensor& logits_rows) const {
    TORCH_CHECK(io_, "QuantStack.step: set_io first");
    TORCH_CHECK(tokens.dim() == 2 && tokens.scalar_type() == torch::kLong && tokens.is_contiguous(),
                "QuantStack.step: tokens [B, T] int64");
    const int64_t B = tokens.size(0), T = tokens.size(1), M = B * T, D = blocks_[0].D;
    TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B && lengths.scalar_type() == torch::kLong &&
                lengths.is_contiguous(), "QuantStack.step: lengths [B] int64");
    const bool tree = depth.defined() && depth.numel() > 0;
    if (tree)  // NOLINT
      TORCH_CHECK(depth.sizes() == tokens.sizes() && depth.scalar_type() == torch::kLong && depth.is_contiguous(),
                  "QuantStack.step: depth [B, T] int64");
    const size_t nt = cos.size();
    TORCH_CHECK(sin.size() == nt && int64_t(nt) <= int64_t(windows_.size()), "QuantStack.step: per attention type cos, sin");
    const bool given = !mask_in.empty();
    TORCH_CHECK(!given || (lo_in.size() == nt && hi_in.size() == nt && mask_in.size() == nt),
                "QuantStack.step: lo, hi and mask for every attention type, or none");
    const int64_t* tp = tokens.data_ptr<int64_t>();
    const int64_t* lp = lengths.data_ptr<int64_t>();
    const int64_t* dp = tree ? depth.data_ptr<int64_t>() : nullptr;
    std::vector<int64_t> pos(M), slots(M);
    int64_t min_len = lp[0], max_len = lp[0];
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(lp[b] >= 0, "QuantStack.step: negative length");
      min_len = std::min(min_len, lp[b]), max_len = std::max(max_len, lp[b]);
      for (int64_t t = 0; t < T; ++t) {
        slots[b * T + t] = lp[b] + t;
        pos[b * T + t] = lp[b] + (tree ? dp[b * T + t] : t);
      }
    }
    // embeddings
    auto h = torch::empty({M, D}, torch::kFloat32);
    float* hp = h.data_ptr<float>();
    const int64_t V = embed_meta_.empty() ? embed_.size(0) : embed_meta_[0];
    for (int64_t r = 0; r < M; ++r) {
      TORCH_CHECK(tp[r] >= 0 && tp[r] < V, "QuantStack.step: token id ", tp[r], " outside the vocabulary (", V, ")");
      float* row = hp + r * D;
      if (embed_meta_.empty())
        std::memcpy(row, embed_.data_ptr<float>() + tp[r] * D, D * sizeof(float));
      else
        quant_row_f32(embed_.data_ptr<uint8_t>(), D, int(embed_meta_[2]), int(embed_meta_[3]), int(embed_meta_[4]),
                      tp[r], row);
      for (int64_t i = 0; i < D; ++i) row[i] *= embed_scale_;
    }
    // per attention type: RoPE rows at the positions, key range and mask
    std::vector<std::vector<float>> cbuf(nt), sbuf(nt), mbuf(nt);
    std::vector<TypeStep> ts(nt);
    for (size_t i = 0; i < nt; ++i) {
      const auto &c = cos[i], &s = sin[i];
      TORCH_CHECK(c.dim() == 2 && s.sizes() == c.sizes() && c.is_contiguous() && s.is_contiguous() &&
                  c.scalar_type() == torch::kFloat32 && s.scalar_type() == torch::kFloat32 && c.size(1) % 2 == 0,
                  "QuantStack.step: RoPE tables fp32 [positions, rotary dims]");
      const int64_t rot = c.size(1);
      cbuf[i].resize(M * rot), sbuf[i].resize(M * rot);
      for (int64_t r = 0; r < M; ++r) {
        TORCH_CHECK(pos[r] < c.size(0), "QuantStack.step: position ", pos[r], " beyond the RoPE table");
        std::memcpy(cbuf[i].data() + r * rot, c.data_ptr<float>() + pos[r] * rot, rot * sizeof(float));
        std::memcpy(sbuf[i].data() + r * rot, s.data_ptr<float>() + pos[r] * rot, rot * sizeof(float));
      }
      int64_t lo, hi;
      torch::Tensor m;
      if (given) {
        lo = lo_in[i], hi = hi_in[i], m = mask_in[i];
      } else {  // key j is visible from position p iff j <= p and (no window or j > p - window)
        const int64_t w = windows_[i];
        hi = max_len + T;
        lo = w ? std::max<int64_t>(0, min_len - w + 1) : 0;
        const int64_t L = hi - lo;
        bool all = true;
        std::vector<float>& mb = mbuf[i];
        for (int64_t r = 0; r < M && all; ++r)
          all = pos[r] >= hi - 1 && (!w || lo > pos[r] - w);
        if (!all) {
          mb.assign(M * L, 0.f);
          for (int64_t r = 0; r < M; ++r)
            for (int64_t j = 0; j < L; ++j) {
              const int64_t key = lo + j;
              if (key > pos[r] || (w && key <= pos[r] - w)) mb[r * L + j] = -INFINITY;
            }
        }
      }
      ts[i] = type_step(cbuf[i].data(), sbuf[i].data(), T * rot, rot, T * rot, rot, rot, lo, hi, m, B, T);
      if (!given && !mbuf[i].empty()) {
        ts[i].mask = mbuf[i].data();
        ts[i].ms0 = T * (hi - lo), ts[i].ms2 = hi - lo, ts[i].ms3 = 1;
      }
    }
    // blocks, final norm, LM head
    auto a = torch::empty_like(h), b = torch::empty_like(h);
    const bool bound = k.empty() && v.empty();
    TORCH_CHECK(!bound || !bound_k_.empty(), "QuantStack.step: no cache given or bound");
    forward_blocks(hp, a.data_ptr<float>(), b.data_ptr<float>(), B, T, ts, bound ? bound_k_ : k, bound ? bound_v_ : v,
                   slots.data(), bound);
    auto hidden = blocks_.size() % 2 ? a : b;
    float* xp = hidden.data_ptr<float>();
    for_rows(M, D, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) norm(xp + r * D, final_norm_.data_ptr<float>(), eps_, offset_, D, xp + r * D);
    });
    const float* x = xp;
    int64_t R = M;
    std::vector<float> picked;
    if (logits_rows.defined() && logits_rows.numel() > 0) {
      TORCH_CHECK(logits_rows.dim() == 1 && logits_rows.scalar_type() == torch::kLong && logits_rows.is_contiguous(),
                  "QuantStack.step: logits_rows [R] int64");
      R = logits_rows.size(0);
      picked.resize(R * D);
      const int64_t* rp = logits_rows.data_ptr<int64_t>();
      for (int64_t r = 0; r < R; ++r) {
        TORCH_CHECK(rp[r] >= 0 && rp[r] < M, "QuantStack.step: logits row outside the step");
        std::memcpy(picked.data() + r * D, xp + rp[r] * D, D * sizeof(float));
      }
      x = picked.data();
    }
    const int64_t NV = head_meta_[0];
    auto logits = torch::empty({R, NV}, torch::kFloat32);
    quant_gemm_f32(x, D, R, head_.data_ptr<uint8_t>(), NV, D, int(head_meta_[2]), int(head_meta_[3]),
                   int(head_meta_[4]), logits.data_ptr<float>(), nullptr);
    int64_t* lw = lengths.data_ptr<int64_t>();
    for (int64_t r = 0; r < B; ++r) lw[r] += T;
    // each row's argmax (the first largest logit, as torch.argmax), read while the logits are in
    // cache: greedy verification needs nothing else (NaN logits: the row's first NaN, as torch)
    auto best = torch::empty({R}, torch::kLong);
    int64_t* bp = best.data_ptr<int64_t>();
    const float* lp2 = logits.data_ptr<float>();
    for (int64_t r = 0; r < R; ++r) bp[r] = argmax(lp2 + r * NV, NV);
    return {logits, hidden, best};
  }

 private:
  // One attention type's step tables; the mask is checked against the key range.
  static TypeStep type_step(const float* c, const float* s, int64_t cs0, int64_t cs1, int64_t ss0, int64_t ss1,
                            int64_t rot, int64_t lo, int64_t hi, const torch::Tensor& m, int64_t B, int64_t T) {
    const int64_t L = hi - lo;
    TORCH_CHECK(lo >= 0 && L > 0, "QuantStack: empty key range");
    const bool has_mask = m.defined() && m.numel() > 0;
    if (has_mask)
      TORCH_CHECK(m.scalar_type() == torch::kFloat32 && m.dim() == 4 && m.size(0) == B && m.size(2) == T &&
                  m.size(3) == L, "QuantStack: mask fp32 [B, 1, T, hi - lo]");
    return TypeStep{c, s, has_mask ? m.data_ptr<float>() : nullptr, cs0, cs1, ss0, ss1,
                    has_mask ? m.stride(0) : 0, has_mask ? m.stride(2) : 0, has_mask ? m.stride(3) : 0, rot, lo, hi};
  }

  // Every block on M = B * T rows from h (a and b: two [M, hidden] buffers the blocks alternate
  // between; the result is in a for an odd number of blocks, else b), after checking the caches.
  void forward_blocks(const float* h, float* a, float* b, int64_t B, int64_t T, const std::vector<TypeStep>& ts,
                      const std::vector<torch::Tensor>& k, const std::vector<torch::Tensor>& v, const int64_t* sp,
                      bool more_rows = false) const {
    const int64_t M = B * T, D = blocks_[0].D;
    TORCH_CHECK(k.size() == blocks_.size() && v.size() == blocks_.size(), "QuantStack: one cache k, v per block");
    int64_t maxq = 0, maxn = 0, maxi = 0;
    for (size_t li = 0; li < blocks_.size(); ++li) {
      const Block& bl = blocks_[li];
      TORCH_CHECK(bl.type < int(ts.size()), "QuantStack: no tables for attention type ", bl.type);
      const auto &kc = k[li], &vc = v[li];
      TORCH_CHECK(kc.dim() == 4 && vc.sizes() == kc.sizes() && (more_rows ? kc.size(0) >= B : kc.size(0) == B) &&
                  kc.size(1) == bl.KVH &&
                  kc.size(3) == bl.HD && kc.scalar_type() == torch::kFloat32 && vc.scalar_type() == torch::kFloat32 &&
                  kc.stride(3) == 1 && vc.stride(3) == 1, "QuantStack: cache k, v fp32 [B, KVH, capacity, HD]");
      TORCH_CHECK(ts[bl.type].hi <= kc.size(2) && ts[bl.type].rot <= bl.HD, "QuantStack: key range outside the cache");
      if (li == 0)
        for (int64_t i = 0; i < M; ++i)
          TORCH_CHECK(sp[i] >= 0 && sp[i] < kc.size(2), "QuantStack: slot outside the cache");
      maxq = std::max(maxq, bl.QS), maxn = std::max(maxn, bl.w[0].N), maxi = std::max(maxi, bl.I);
    }
    Scratch sc;
    sc.x.resize(M * std::max(D, maxq)), sc.qkv.resize(M * maxn), sc.att.resize(M * maxq), sc.o.resize(M * D);
    sc.gu.resize(M * 2 * maxi), sc.act.resize(M * maxi), sc.ex.resize(M * maxi);
    const float* cur = h;
    for (size_t li = 0; li < blocks_.size(); ++li) {
      float* nxt = li % 2 ? b : a;
      block_forward(blocks_[li], cur, nxt, B, T, ts[blocks_[li].type], k[li], v[li], sp, eps_, offset_, scale_, gelu_,
                    sc);
      cur = nxt;
    }
  }

  std::vector<Block> blocks_;
  std::vector<torch::Tensor> keep_;  // the tensors the blocks point into
  float eps_, offset_, scale_;
  bool gelu_;
  bool io_ = false;  // set_io called
  torch::Tensor embed_, final_norm_, head_;
  std::vector<int64_t> embed_meta_, head_meta_, windows_;
  float embed_scale_ = 1.f;
  std::vector<torch::Tensor> bound_k_, bound_v_;
};

// The MLP activation of the blocks (glu), for tests: gu [M, 2I] fp32 -> act(g) * u [M, I].
torch::Tensor rms_norm_rows(const torch::Tensor& x, const torch::Tensor& w, double eps, double offset) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && w.dim() == 1 &&
              w.numel() == x.size(1) && w.scalar_type() == torch::kFloat32 && w.is_contiguous(),
              "rms_norm_rows: x contiguous fp32 [M, n], w fp32 [n]");
  auto out = torch::empty_like(x);
  const int64_t M = x.size(0), n = x.size(1);
  for (int64_t r = 0; r < M; ++r)
    norm(x.data_ptr<float>() + r * n, w.data_ptr<float>(), float(eps), float(offset), n, out.data_ptr<float>() + r * n);
  return out;
}

torch::Tensor argmax_rows(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "argmax_rows: x contiguous fp32 [M, n > 0]");
  auto out = torch::empty({x.size(0)}, torch::kLong);
  for (int64_t r = 0; r < x.size(0); ++r) out[r] = argmax(x.data_ptr<float>() + r * x.size(1), x.size(1));
  return out;
}

torch::Tensor glu_rows(const torch::Tensor& gu, bool gelu) {
  TORCH_CHECK(gu.dim() == 2 && gu.size(1) % 2 == 0 && gu.scalar_type() == torch::kFloat32 && gu.is_contiguous(),
              "glu_rows: gu must be contiguous fp32 [M, 2I]");
  const int64_t M = gu.size(0), I = gu.size(1) / 2;
  auto out = torch::empty({M, I}, gu.options());
  std::vector<float> e(size_t(std::max<int64_t>(I, 1)));
  for (int64_t r = 0; r < M; ++r) glu(gu.data_ptr<float>() + r * 2 * I, I, gelu, e.data(), out.data_ptr<float>() + r * I);
  return out;
}

void register_quant_block(pybind11::module& m) {
  m.def("glu_rows", &glu_rows, "the fused blocks' MLP activation act(g) * u (tests)");
  m.def("rms_norm_rows", &rms_norm_rows, "the fused blocks' RMS norm of each row (tests)");
  m.def("argmax_rows", &argmax_rows, "the fused step's argmax of each row (tests)");
  pybind11::class_<QuantStack>(m, "QuantStack", "a quantized target's decoder blocks for decode / verify steps")
      .def(pybind11::init<const std::vector<std::vector<torch::Tensor>>&, const std::vector<std::vector<int64_t>>&,
                          const std::vector<std::vector<torch::Tensor>>&, const std::vector<std::vector<torch::Tensor>>&,
                          const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<int64_t>&, int64_t,
                          double, double, double, bool>())
      .def("run", &QuantStack::run, "apply every block to a step's rows (models/fused.py)")
      .def("set_io", &QuantStack::set_io, "the embedding, final norm and LM head step() uses")
      .def("bind_cache", &QuantStack::bind_cache, "the cache step() uses when given none")
      .def("step", &QuantStack::step, "a whole decode / verify step: embeddings, blocks, final norm, logits");
}
