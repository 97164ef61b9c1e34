// Attention for decode and verify steps whose result for one query does not depend on the other
// queries of the step, the other rows of the batch, or how many masked keys surround its own.
//
// torch's scaled_dot_product_attention blocks its reductions by the shape of the whole call (the
// number of queries, the key range, padding rows), so one query's output can differ in the last
// bits between a plain decode step (1 query) and a verify step (k+1 queries), or between a row
// alone and in a batch. Those bits are enough to flip a near-tie (and int8 activation rounding in
// quantized layers amplifies them). Here each query reads only its visible keys, in key order,
// with a fixed operation order:
//
//   s_j = (q . k_j) * scale + mask_j        (dot: 8 fp32 lanes over the head dim, then a fixed sum)
//   p_j = exp(s_j - max s)                  (fp32, `exp_lanes`: one polynomial, the same bits in
//                                            the AVX2 and portable paths; 0 below e^-87)
//   out = sum_j p_j v_j / sum_j p_j         (j ascending, visible only; the weighted sum in fp32
//                                            fused multiply-adds per element, the normaliser in fp64:
//                                            four running sums, key j into sum j mod 4, then
//                                            (s0 + s1) + (s2 + s3))
//
// q [B, H, T, D] fp32, k / v [B, KVH, L, D] fp32 or bf16 (unit stride in D; bf16 widens to fp32
// exactly on load, so the arithmetic above is unchanged), mask [B, 1, T, L] additive (0 / -inf) or
// none; D a multiple of 8. Heads share K/V in groups of H / KVH (GQA).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

bool g_attn_portable = false;  // tests: force the portable paths (attention, exp, quant_block.cpp's norms and argmax)

namespace {

bool attn_avx2() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
}

// Keys and values are prefetched ~kPrefetchBytes ahead of the one being read (in whole keys, at least
// 8): the default model's decode step at 300 / 1000 cached tokens ran 1.15x / 1.13x faster with
// ~12 KB (48 keys of 64 dims) than with none, 1.03-1.06x at batch 8 (2 threads, interleaved);
// 16-64 keys were within a few percent of each other.
constexpr int64_t kPrefetchBytes = 12288;
template <typename KV>
inline int64_t prefetch_keys(int64_t D) { return std::max<int64_t>(8, kPrefetchBytes / (D * int64_t(sizeof(KV)))); }

// K/V elements: fp32, or bf16 (raw bits) widened exactly to fp32.
inline float kv_f32(float x) { return x; }
inline float kv_f32(uint16_t x) { return float(c10::BFloat16(x, c10::BFloat16::from_bits())); }
__attribute__((target("avx2,fma"))) inline __m256 kv_load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"))) inline __m256 kv_load8(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

template <typename KV>
__attribute__((target("avx2,fma"))) float dot_avx2(const float* a, const KV* b, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), kv_load8(b + i), acc);
  alignas(32) float l[8];
  _mm256_store_ps(l, acc);
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

template <typename KV>
float dot_portable(const float* a, const KV* b, int64_t d) {
  float l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < d; i += 8)
    for (int j = 0; j < 8; ++j) l[j] = std::fma(a[i + j], kv_f32(b[i + j]), l[j]);
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

// Scores of keys 0..L-1 for one query, 8 keys at a time: 8 dot-product accumulators reduced by
// one transpose-and-add (hadd), which sums each key's 8 lanes in dot_avx2's order exactly:
// ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)). The caller scales and masks them (in code
// compiled without FMA, so `dot * scale + mask` is never contracted into one rounding).
__attribute__((target("avx2,fma"))) inline __m256 sum_lanes8(const __m256* a) {
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

template <typename KV>
__attribute__((target("avx2,fma"))) void dots_avx2(const float* q, const KV* kb, int64_t ksl, int64_t L,
                                                   int64_t D, float* out) {
  const int64_t ahead = prefetch_keys<KV>(D);
  int64_t j = 0;
  for (; j + 8 <= L; j += 8) {
    __m256 a[8];
    for (int r = 0; r < 8; ++r) a[r] = _mm256_setzero_ps();
    for (int r = 0; r < 8; ++r)  // the keys `ahead` further on (past the end: a harmless hint)
      for (int64_t d = 0; d < D; d += 64 / int64_t(sizeof(KV)))
        _mm_prefetch(reinterpret_cast<const char*>(kb + (j + ahead + r) * ksl + d), _MM_HINT_T0);
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      for (int r = 0; r < 8; ++r) a[r] = _mm256_fmadd_ps(qv, kv_load8(kb + (j + r) * ksl + d), a[r]);
    }
    _mm256_storeu_ps(out + j, sum_lanes8(a));
  }
  for (; j < L; ++j) out[j] = dot_avx2(q, kb + j * ksl, D);
}

// acc += p * v (one fused multiply-add per element: both paths give the same bits)
template <typename KV>
__attribute__((target("avx2,fma"))) void axpy_avx2(float p, const KV* v, float* acc, int64_t d) {
  const __m256 pv = _mm256_set1_ps(p);
  for (int64_t i = 0; i < d; i += 8)
    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(pv, kv_load8(v + i), _mm256_loadu_ps(acc + i)));
}

template <typename KV>
void axpy_portable(float p, const KV* v, float* acc, int64_t d) {
  for (int64_t i = 0; i < d; ++i) acc[i] = std::fma(p, kv_f32(v[i]), acc[i]);
}

// acc[0..D) = sum_j p_j v_j over the keys with p_j != 0, j ascending: 64 values at a time in
// registers (the same per-element fused multiply-adds in the same order as axpy_portable).
template <typename KV>
__attribute__((target("avx2,fma"))) void values_avx2(const float* p, const KV* vb, int64_t vsl, int64_t L,
                                                     int64_t D, float* acc) {
  const int64_t ahead = prefetch_keys<KV>(D);
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) {
    __m256 a[8];
    for (int r = 0; r < 8; ++r) a[r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < L; ++j) {
      for (int o = 0; o < 64; o += 64 / int(sizeof(KV)))
        _mm_prefetch(reinterpret_cast<const char*>(vb + (j + ahead) * vsl + d0 + o), _MM_HINT_T0);
      if (p[j] == 0.f) continue;
      const __m256 pv = _mm256_set1_ps(p[j]);
      const KV* vr = vb + j * vsl + d0;
      for (int r = 0; r < 8; ++r) a[r] = _mm256_fmadd_ps(pv, kv_load8(vr + 8 * r), a[r]);
    }
    for (int r = 0; r < 8; ++r) _mm256_storeu_ps(acc + d0 + 8 * r, a[r]);
  }
  if (d0 < D) {
    for (int64_t i = d0; i < D; ++i) acc[i] = 0.f;
    for (int64_t j = 0; j < L; ++j)
      if (p[j] != 0.f) axpy_avx2(p[j], vb + j * vsl + d0, acc + d0, D - d0);
  }
}

// exp(x) for x <= 0 (Cephes' expf): n = round(x log2 e), r = x - n ln 2 (in two parts), then
// 2^n * (1 + r + r^2 P(r)); 0 for x < -87 (or -inf). Every step is one fp32 operation or fused
// multiply-add, in the same order in both paths, so they agree to the bit (within ~2 ulp of exp).
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f, kP3 = 4.1665795894e-2f,
                kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;

float exp_portable(float x) {
  if (!(x >= -87.0f)) return 0.f;
  const float n = std::nearbyint(x * kLog2e);
  float r = std::fma(n, -kLn2Hi, x);
  r = std::fma(n, -kLn2Lo, r);
  float p = std::fma(kP0, r, kP1);
  p = std::fma(p, r, kP2);
  p = std::fma(p, r, kP3);
  p = std::fma(p, r, kP4);
  p = std::fma(p, r, kP5);
  const float y = std::fma(p, r * r, r) + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return y * scale;
}

__attribute__((target("avx2,fma"))) void exp_lanes_avx2(float* s, int64_t L) {
  int64_t j = 0;
  for (; j + 8 <= L; j += 8) {
    const __m256 x = _mm256_loadu_ps(s + j);
    const __m256 ok = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
    const __m256 xc = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  // -inf lanes: any finite input, masked below
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Hi), xc);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(-kLn2Lo), r);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kP0), r, _mm256_set1_ps(kP1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP5));
    const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    _mm256_storeu_ps(s + j, _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), ok));
  }
  for (; j < L; ++j) s[j] = exp_portable(s[j]);
}

// Scores of one query: s[j] = -inf where the mask is -inf, else s[j] * sc + m[j] (m: the mask row
// with unit stride, or nullptr: 0); returns max_j s[j]. A multiply then an add, never fused: this
// function's target has no FMA, so the compiler cannot contract them. The max is exact in any order.
__attribute__((target("avx2"))) float scale_mask_max_avx2(float* s, const float* m, int64_t L, float sc) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const __m256 scv = _mm256_set1_ps(sc), ninf = _mm256_set1_ps(kNegInf);
  __m256 mxv = ninf;
  int64_t j = 0;
  for (; j + 8 <= L; j += 8) {
    __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s + j), scv);
    if (m) {
      const __m256 mv = _mm256_loadu_ps(m + j);
      x = _mm256_blendv_ps(_mm256_add_ps(x, mv), ninf, _mm256_cmp_ps(mv, ninf, _CMP_EQ_OQ));
    }
    _mm256_storeu_ps(s + j, x);
    mxv = _mm256_max_ps(mxv, x);
  }
  alignas(32) float l[8];
  _mm256_store_ps(l, mxv);
  float mx = kNegInf;
  for (int i = 0; i < 8; ++i) mx = std::max(mx, l[i]);
  for (; j < L; ++j) {
    const float mj = m ? m[j] : 0.f;
    s[j] = mj == kNegInf ? mj : s[j] * sc + mj;
    mx = std::max(mx, s[j]);
  }
  return mx;
}

// s[j] -= mx, then the softmax normaliser sum_j s[j] after exp: in fp64, as four running sums
// (key j into sum j mod 4, j ascending) added as (s0 + s1) + (s2 + s3): the portable path's order.
__attribute__((target("avx2"))) void shift_avx2(float* s, int64_t L, float mx) {
  const __m256 mv = _mm256_set1_ps(mx);
  int64_t j = 0;
  for (; j + 8 <= L; j += 8) _mm256_storeu_ps(s + j, _mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
  for (; j < L; ++j) s[j] -= mx;
}

__attribute__((target("avx2"))) double sum4_avx2(const float* s, int64_t L) {
  __m256d a = _mm256_setzero_pd();
  int64_t j = 0;
  for (; j + 4 <= L; j += 4) a = _mm256_add_pd(a, _mm256_cvtps_pd(_mm_loadu_ps(s + j)));
  alignas(32) double l[4];
  _mm256_store_pd(l, a);
  for (; j < L; ++j) l[j % 4] += double(s[j]);
  return (l[0] + l[1]) + (l[2] + l[3]);
}

double sum4_portable(const float* s, int64_t L) {
  double l[4] = {0, 0, 0, 0};
  for (int64_t j = 0; j < L; ++j) l[j % 4] += double(s[j]);
  return (l[0] + l[1]) + (l[2] + l[3]);
}

// s[j] = exp(s[j]) for the L scores (already shifted by their max)
void exp_lanes(float* s, int64_t L, bool avx2) {
  if (avx2) {
    exp_lanes_avx2(s, L);
    return;
  }
  for (int64_t j = 0; j < L; ++j) s[j] = exp_portable(s[j]);
}

}  // namespace

// s[i] = exp(s[i]) for n values <= 0 (exp_lanes: the same bits in the AVX2 and portable paths),
// for other kernels of the extension (quant_block.cpp's activations).
void exp_nonpositive_raw(float* s, int64_t n) { exp_lanes(s, n, attn_avx2() && !g_attn_portable); }

namespace {

template <typename KV>
void attend_rows_kv(const float* qp, int64_t qsb, int64_t qsh, int64_t qst, const KV* kp, int64_t ksb, int64_t ksh,
                    int64_t ksl, const KV* vp, int64_t vsb, int64_t vsh, int64_t vsl, const float* mp, int64_t msb,
                    int64_t mst, int64_t msl, int64_t B, int64_t H, int64_t T, int64_t D, int64_t KVH, int64_t L,
                    float sc, float* op, int64_t osb, int64_t osh, int64_t ost) {
  const bool avx2 = attn_avx2() && !g_attn_portable;
  const int64_t group = H / KVH;
  at::parallel_for(0, B * H, 1, [&](int64_t s, int64_t e) {
    std::vector<float> score(static_cast<size_t>(L));
    std::vector<float> acc(static_cast<size_t>(D));
    for (int64_t bh = s; bh < e; ++bh) {
      const int64_t b = bh / H, h = bh % H, g = h / group;
      const KV* kb = kp + b * ksb + g * ksh;
      const KV* vb = vp + b * vsb + g * vsh;
      for (int64_t t = 0; t < T; ++t) {
        const float* qr = qp + b * qsb + h * qsh + t * qst;
        const float* mr = mp ? mp + b * msb + t * mst : nullptr;
        constexpr float kNegInf = -std::numeric_limits<float>::infinity();
        // Only keys j0..j1-1 can be visible: the masked keys at either end are skipped (a batch's
        // shorter rows, a sliding window's start). Same bits: each key's dot is computed alone,
        // and a masked key's weight is exactly 0, which the sum and the values already skip.
        int64_t j0 = 0, j1 = L;
        if (mr) {
          while (j1 > 0 && mr[(j1 - 1) * msl] == kNegInf) --j1;
          while (j0 < j1 && mr[j0 * msl] == kNegInf) ++j0;
        }
        const int64_t n = j1 - j0;
        const KV* kr = kb + j0 * ksl;
        if (mr) mr += j0 * msl;
        if (avx2)
          dots_avx2(qr, kr, ksl, n, D, score.data());
        else
          for (int64_t j = 0; j < n; ++j) score[j] = dot_portable(qr, kr + j * ksl, D);
        float mx = kNegInf;
        if (avx2 && (!mr || msl == 1)) {
          mx = scale_mask_max_avx2(score.data(), mr, n, sc);
        } else {
          for (int64_t j = 0; j < n; ++j) {
            const float m = mr ? mr[j * msl] : 0.f;
            score[j] = m == kNegInf ? m : score[j] * sc + m;  // a masked key: -inf whatever its dot
            mx = std::max(mx, score[j]);
          }
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        double sum = 0.0;
        if (mx != kNegInf) {
          const KV* vr = vb + j0 * vsl;
          if (avx2)  // -inf stays -inf: exp gives 0
            shift_avx2(score.data(), n, mx);
          else
            for (int64_t j = 0; j < n; ++j) score[j] -= mx;
          exp_lanes(score.data(), n, avx2);
          sum = avx2 ? sum4_avx2(score.data(), n) : sum4_portable(score.data(), n);
          if (avx2) {
            values_avx2(score.data(), vr, vsl, n, D, acc.data());
          } else {
            for (int64_t j = 0; j < n; ++j)
              if (score[j] != 0.f) axpy_portable(score[j], vr + j * vsl, acc.data(), D);
          }
        }
        float* orow = op + b * osb + h * osh + t * ost;
        for (int64_t i = 0; i < D; ++i) orow[i] = sum > 0.0 ? float(double(acc[i]) / sum) : 0.f;  // no visible key: 0
      }
    }
  });
}

}  // namespace

// The raw form, for other kernels of the extension (quant_block.cpp): element strides of q, k, v
// (per row b, head h, query t / key j; unit stride in D), of the mask (nullptr: none) and of out.
void attend_rows_raw(const float* qp, int64_t qsb, int64_t qsh, int64_t qst, const float* kp, int64_t ksb,
                     int64_t ksh, int64_t ksl, const float* vp, int64_t vsb, int64_t vsh, int64_t vsl,
                     const float* mp, int64_t msb, int64_t mst, int64_t msl, int64_t B, int64_t H, int64_t T,
                     int64_t D, int64_t KVH, int64_t L, float sc, float* op, int64_t osb, int64_t osh, int64_t ost) {
  attend_rows_kv<float>(qp, qsb, qsh, qst, kp, ksb, ksh, ksl, vp, vsb, vsh, vsl, mp, msb, mst, msl, B, H, T, D, KVH, L,
                        sc, op, osb, osh, ost);
}

torch::Tensor attend_rows(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                          const c10::optional<torch::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attend_rows: 4-D q, k, v");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32, "attend_rows: fp32 queries only");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() &&
              (k.scalar_type() == torch::kFloat32 || k.scalar_type() == torch::kBFloat16),
              "attend_rows: k and v both fp32 or both bf16");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  const int64_t KVH = k.size(1), L = k.size(2);
  TORCH_CHECK(D % 8 == 0 && k.size(3) == D && v.size(3) == D && v.size(2) == L && H % KVH == 0,
              "attend_rows: shapes");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "attend_rows: unit stride in D");
  const bool has_mask = mask.has_value() && mask->defined();
  const float* mp = nullptr;
  int64_t msb = 0, mst = 0, msl = 0;
  if (has_mask) {
    TORCH_CHECK(mask->scalar_type() == torch::kFloat32 && mask->dim() == 4 && mask->size(0) == B &&
                mask->size(1) == 1 && mask->size(2) == T && mask->size(3) == L, "attend_rows: mask [B, 1, T, L] fp32");
    mp = mask->data_ptr<float>();
    msb = mask->stride(0), mst = mask->stride(2), msl = mask->stride(3);
  }
  auto out = torch::empty({B, H, T, D}, q.options());
  if (k.scalar_type() == torch::kFloat32) {
    attend_rows_raw(q.data_ptr<float>(), q.stride(0), q.stride(1), q.stride(2), k.data_ptr<float>(), k.stride(0),
                    k.stride(1), k.stride(2), v.data_ptr<float>(), v.stride(0), v.stride(1), v.stride(2), mp, msb, mst,
                    msl, B, H, T, D, KVH, L, float(scale), out.data_ptr<float>(), H * T * D, T * D, D);
  } else {
    attend_rows_kv<uint16_t>(q.data_ptr<float>(), q.stride(0), q.stride(1), q.stride(2),
                             reinterpret_cast<const uint16_t*>(k.data_ptr()), k.stride(0), k.stride(1), k.stride(2),
                             reinterpret_cast<const uint16_t*>(v.data_ptr()), v.stride(0), v.stride(1), v.stride(2), mp,
                             msb, mst, msl, B, H, T, D, KVH, L, float(scale), out.data_ptr<float>(), H * T * D, T * D, D);
  }
  return out;
}

void register_attention(pybind11::module& m) {
  m.def("attend_rows", &attend_rows, "batch-invariant attention for decode/verify steps, fp32 or bf16 K/V (models/layers.py)");
  m.def("attend_force_portable", [](bool on) { g_attn_portable = on; }, "tests: the portable paths (attention, exp, the fused blocks' norms and argmax)");
}
