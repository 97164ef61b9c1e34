// One decoder block of a quantized target in one call, for decode and verify steps (fp32 rows).
//
// The per-op path (models/layers.py) runs ~25 torch ops per block; for a 135M model decoding one
// token they cost more than the block's arithmetic. This runs the same block, row by row:
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
// h [M, D] (M = B * T rows, row b*T + t), cos / sin [B, T, ROT] (RoPE tables at the rows'
// positions, ROT <= head dim, rotate-half), the layer's cache k / v [B, KVH, capacity, HD] (unit
// stride in HD), slots [B, T] (where each row's K/V go), key range [lo, hi) of the cache that
// attention reads, additive mask [B, 1, T, hi - lo] or an empty tensor (every key visible).

#include <torch/extension.h>
#include <cmath>
#include <cstdint>
#include <vector>

void quant_gemm_f32(const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t N, int64_t K, int fmt, int B,
                    float* y, const float* bias);
void attend_rows_raw(const float* qp, int64_t qsb, int64_t qsh, int64_t qst, const float* kp, int64_t ksb,
                     int64_t ksh, int64_t ksl, const float* vp, int64_t vsb, int64_t vsh, int64_t vsl,
                     const float* mp, int64_t msb, int64_t mst, int64_t msl, int64_t B, int64_t H, int64_t T,
                     int64_t D, int64_t KVH, int64_t L, float sc, float* op, int64_t osb, int64_t osh, int64_t ost);

namespace {

struct QW {  // one packed quantized weight (kernels/quant.py's QuantLinear)
  const uint8_t* w;
  int64_t N, K;
  int fmt, block;
  const float* bias;
};

const float* opt_ptr(const torch::Tensor& t) { return t.defined() && t.numel() ? t.data_ptr<float>() : nullptr; }

void gemm(const QW& q, const float* x, int64_t M, float* y) {
  quant_gemm_f32(x, q.K, M, q.w, q.N, q.K, q.fmt, q.block, y, q.bias);
}

// y = x * (1 / sqrt(mean(x^2) + eps)) * (w + offset) over n values (in place allowed)
inline void norm(const float* x, const float* w, float eps, float offset, int64_t n, float* y) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * double(x[i]);
  const float inv = 1.0f / std::sqrt(float(ss / double(n)) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * inv * (w[i] + offset);
}

// rotate-half RoPE of one head vector (first rot dims), in place
inline void rope(float* x, const float* c, const float* s, int64_t rot) {
  const int64_t half = rot / 2;
  float tmp[1024];
  for (int64_t d = 0; d < rot; ++d) tmp[d] = x[d];
  for (int64_t d = 0; d < rot; ++d) x[d] = tmp[d] * c[d] + (d < half ? -tmp[d + half] : tmp[d - half]) * s[d];
}

inline float gelu_tanh(float x) {
  const float c = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * x * (1.0f + std::tanh(c * (x + 0.044715f * x * x * x)));
}
inline float silu(float x) { return x / (1.0f + std::exp(-x)); }

}  // namespace

torch::Tensor quant_block(const torch::Tensor& h, const std::vector<torch::Tensor>& packed,
                          const std::vector<int64_t>& shapes, const std::vector<torch::Tensor>& biases,
                          const std::vector<torch::Tensor>& norms, double eps_d, double offset_d,
                          const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& kc,
                          const torch::Tensor& vc, const torch::Tensor& slots, int64_t lo, int64_t hi,
                          const torch::Tensor& mask, int64_t NH, int64_t KVH, double scale, bool gelu) {
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && h.scalar_type() == torch::kFloat32, "quant_block: h [M, D] fp32");
  TORCH_CHECK(packed.size() == 4 && shapes.size() == 16 && biases.size() == 4 && norms.size() == 6,
              "quant_block: 4 weights (qkv, o, gate_up, down) with 4 shapes each, 4 biases, 6 norms");
  TORCH_CHECK(kc.dim() == 4 && vc.sizes() == kc.sizes() && kc.scalar_type() == torch::kFloat32 &&
              vc.scalar_type() == torch::kFloat32 && kc.stride(3) == 1 && vc.stride(3) == 1,
              "quant_block: cache k, v fp32 [B, KVH, capacity, HD], unit stride in HD");
  const int64_t M = h.size(0), D = h.size(1), B = kc.size(0), HD = kc.size(3), CAP = kc.size(2);
  TORCH_CHECK(kc.size(1) == KVH && NH % KVH == 0 && HD % 8 == 0 && HD <= 1024, "quant_block: heads / head dim");
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) == B && slots.scalar_type() == torch::kLong && slots.is_contiguous(),
              "quant_block: slots [B, T] int64");
  const int64_t T = slots.size(1);
  TORCH_CHECK(M == B * T, "quant_block: h must hold B * T rows");
  TORCH_CHECK(cos.dim() == 3 && cos.size(0) == B && cos.size(1) == T && sin.sizes() == cos.sizes() &&
              cos.stride(2) == 1 && sin.stride(2) == 1 && cos.scalar_type() == torch::kFloat32 &&
              sin.scalar_type() == torch::kFloat32 && cos.size(2) <= HD && cos.size(2) % 2 == 0,
              "quant_block: cos / sin fp32 [B, T, rotary dims]");
  TORCH_CHECK(0 <= lo && lo < hi && hi <= CAP, "quant_block: key range outside the cache");
  const int64_t L = hi - lo;
  const bool has_mask = mask.defined() && mask.numel() > 0;
  if (has_mask)
    TORCH_CHECK(mask.scalar_type() == torch::kFloat32 && mask.dim() == 4 && mask.size(0) == B && mask.size(2) == T &&
                mask.size(3) == L, "quant_block: mask fp32 [B, 1, T, hi - lo]");
  QW w[4];
  for (int i = 0; i < 4; ++i) {
    w[i] = QW{packed[i].data_ptr<uint8_t>(), shapes[4 * i], shapes[4 * i + 1], int(shapes[4 * i + 2]),
              int(shapes[4 * i + 3]), opt_ptr(biases[i])};
    TORCH_CHECK(packed[i].scalar_type() == torch::kUInt8 && packed[i].is_contiguous(), "quant_block: packed weights");
    const int64_t qbytes = w[i].fmt == 8 ? w[i].block * 16 : w[i].block * 8;
    TORCH_CHECK(w[i].K % w[i].block == 0 && packed[i].numel() == (w[i].N + 15) / 16 * (w[i].K / w[i].block) * (qbytes + 128),
                "quant_block: packed size does not match its shape");
  }
  const int64_t QS = NH * HD, KS = KVH * HD, I = w[2].N / 2;
  TORCH_CHECK(w[0].K == D && w[0].N == QS + 2 * KS && w[1].K == QS && w[1].N == D && w[2].K == D &&
              w[3].K == I && w[3].N == D, "quant_block: weight shapes do not fit the block");
  for (int i = 0; i < 6; ++i) {
    const int64_t n = (i == 2 || i == 3) ? HD : D;
    TORCH_CHECK(!norms[i].defined() || norms[i].numel() == 0 || (norms[i].numel() == n && norms[i].is_contiguous() &&
                norms[i].scalar_type() == torch::kFloat32), "quant_block: norm weight ", i, " size");
  }
  TORCH_CHECK(opt_ptr(norms[0]) && opt_ptr(norms[1]), "quant_block: the attention and MLP norms are required");
  const float eps = float(eps_d), offset = float(offset_d);
  const float* hp = h.data_ptr<float>();
  const float *n_attn = opt_ptr(norms[0]), *n_mlp = opt_ptr(norms[1]), *n_q = opt_ptr(norms[2]),
              *n_k = opt_ptr(norms[3]), *n_ao = opt_ptr(norms[4]), *n_mo = opt_ptr(norms[5]);
  const int64_t ROT = cos.size(2);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < M; ++i)
    TORCH_CHECK(sp[i] >= 0 && sp[i] < CAP, "quant_block: slot outside the cache");

  std::vector<float> x(M * std::max(D, QS)), qkv(M * w[0].N), att(M * QS), o(M * D), gu(M * 2 * I), act(M * I);
  auto out = torch::empty_like(h);
  float* hn = out.data_ptr<float>();

  // attention
  for (int64_t r = 0; r < M; ++r) norm(hp + r * D, n_attn, eps, offset, D, x.data() + r * D);
  gemm(w[0], x.data(), M, qkv.data());
  float* kp = kc.data_ptr<float>();
  float* vp = vc.data_ptr<float>();
  for (int64_t r = 0; r < M; ++r) {
    const int64_t b = r / T, t = r % T;
    const float* c = cos.data_ptr<float>() + b * cos.stride(0) + t * cos.stride(1);
    const float* s = sin.data_ptr<float>() + b * sin.stride(0) + t * sin.stride(1);
    float* row = qkv.data() + r * w[0].N;
    for (int64_t hh = 0; hh < NH + KVH; ++hh) {
      float* x1 = row + hh * HD;
      const float* nw = hh < NH ? n_q : n_k;
      if (nw) norm(x1, nw, eps, offset, HD, x1);
      rope(x1, c, s, ROT);
    }
    const int64_t slot = sp[r];
    for (int64_t g = 0; g < KVH; ++g) {
      std::memcpy(kp + b * kc.stride(0) + g * kc.stride(1) + slot * kc.stride(2), row + QS + g * HD, HD * sizeof(float));
      std::memcpy(vp + b * vc.stride(0) + g * vc.stride(1) + slot * vc.stride(2), row + QS + KS + g * HD,
                  HD * sizeof(float));
    }
  }
  const float* mp = has_mask ? mask.data_ptr<float>() : nullptr;
  attend_rows_raw(qkv.data(), T * w[0].N, HD, w[0].N, kp + lo * kc.stride(2), kc.stride(0), kc.stride(1), kc.stride(2),
                  vp + lo * vc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2), mp,
                  has_mask ? mask.stride(0) : 0, has_mask ? mask.stride(2) : 0, has_mask ? mask.stride(3) : 0, B, NH, T,
                  HD, KVH, L, float(scale), att.data(), T * QS, HD, QS);
  gemm(w[1], att.data(), M, o.data());
  for (int64_t r = 0; r < M; ++r) {
    float* orow = o.data() + r * D;
    if (n_ao) norm(orow, n_ao, eps, offset, D, orow);
    for (int64_t i = 0; i < D; ++i) hn[r * D + i] = hp[r * D + i] + orow[i];
  }
  // MLP
  for (int64_t r = 0; r < M; ++r) norm(hn + r * D, n_mlp, eps, offset, D, x.data() + r * D);
  gemm(w[2], x.data(), M, gu.data());
  for (int64_t r = 0; r < M; ++r) {
    const float* g = gu.data() + r * 2 * I;
    float* a = act.data() + r * I;
    for (int64_t i = 0; i < I; ++i) a[i] = (gelu ? gelu_tanh(g[i]) : silu(g[i])) * g[I + i];
  }
  gemm(w[3], act.data(), M, o.data());
  for (int64_t r = 0; r < M; ++r) {
    float* orow = o.data() + r * D;
    if (n_mo) norm(orow, n_mo, eps, offset, D, orow);
    for (int64_t i = 0; i < D; ++i) hn[r * D + i] += orow[i];
  }
  return out;
}

void register_quant_block(pybind11::module& m) {
  m.def("quant_block", &quant_block, "one quantized decoder block for decode / verify steps (models/fused.py)");
}
