// Weight-only quantized GEMM: y[M,N] = x[M,K] @ W^T (+ bias), W kept as 4- or 8-bit integers with
// one fp32 scale d and offset m per output feature and block of B inputs:
//
//     W[n][k] = d[n][b] * q[n][k] + m[n][b],     b = k / B
//
// Packed layout (mtpspec/kernels/quant.py writes it): panels of 16 output features; each panel
// holds its K/B blocks one after the other, each block its integers then its scales in one of three
// modes `sm`: 0 = d[16], m[16] fp32; 1 = d[16], m[16] fp16; 2 = d[16] fp16 and m = 0. quant.py
// picks the smallest exact one (GGUF's Q4_0/Q4_1/Q5_x/Q8_0 store fp16 scales: mode 1 or 2, as few
// bytes per weight as the file). The kernel widens fp16 to fp32 (exact), so the arithmetic below
// is the same in every mode:
//
//   fmt 8 (B = 16 or 32):  int8   Q[g][j][i]  = q[16p+j][bB + 4g + i]            g < B/4   (B*16 bytes)
//   fmt 4 (B = 32):        nibbles Q[g][j][i]: low = q[16p+j][bB + 8g + i], high = ...[bB + 8g + 4 + i]
//                          (q in 0..15)                                         g < B/8   (B*8 bytes)
//
// Activations are quantized per row and block to int8, as llama.cpp does (its Q8 activations):
//   dx = max|x_block| / 127,  qx = round(x / dx) in [-127, 127],  xs = dx * sum(qx)
// and then, with the integer dot products exact in int32,
//   y[n] = sum_b  d[n][b] * dx_b * (q[n] . qx)_b  +  m[n][b] * xs_b        (fp32, block order)
// Each row's result depends only on that row: one token gives the same logits alone, in a batch,
// or inside a verify step (speculative decoding stays lossless against plain decoding).
//
// Paths: AVX-512 VNNI (vpdpbusd: one 64-byte group [16 features][4 inputs] is one register, each
// int32 lane summing its feature's 4 u8 x s8 products; 4-bit weights are unsigned, int8 weights
// are offset to w + 128 and 128 * sum(qx) subtracted, exact in int32), AVX2 (maddubs: u8 x s8 pair
// products into int16; int8 weights go through |w| x sign(x, w), as llama.cpp does; no int16 sum
// can overflow) and portable C++, all with the same integer sums and the same fp32 operations in
// the same order, so they give bit-identical results (tests check it).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr int PW = 16;  // output features per panel
constexpr int64_t MC = 64;  // rows per chunk (run)
// AVX2: the weight stream is prefetched this many bytes ahead (whole blocks), at every row count.
// At 4 blocks (~1.3-2 KB) only int8 weights and 4-bit weights at 1-2 rows gained (an AMD EPYC: Q8_0
// decode 1.09x, 4-bit decode 1.05x, 2-row verify 1.02-1.04x). On a Xeon with this path forced, the
// default model's matmuls (every weight in turn, 2 threads, interleaved) then ran 1.2x faster at 1
// row, 1.07x at 2-3 and 1.01-1.02x at 5-8 with ~4 KB (12 blocks) than with 4 blocks at 1-2 rows.
constexpr int64_t kPrefetchBytes = 4096;
// AVX2: up to this many rows stream each block straight from memory (dot_block_stream_avx2)
// instead of unpacking it once for all rows. Measured against unpacking, one thread, interleaved:
// 4-bit 1.4-1.5x at 1 row, 1.2-1.3x at 2, 1.1-1.2x at 3-4, 1.03x at 5-6, 0.8x at 8; int8 1.4-1.5x
// at 1-2 rows, 1.1-1.2x at 4-8, 1.05x at 16, 0.98x at 64.
constexpr int64_t kStreamRows4 = 6;
constexpr int64_t kStreamRows8 = 16;

enum QIsa { Q_SCALAR = 0, Q_AVX2 = 1, Q_VNNI = 2 };

QIsa q_detect() {
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
    return Q_SCALAR;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni"))
    return Q_VNNI;
  return Q_AVX2;
}
const QIsa q_detected = q_detect();
QIsa q_isa = q_detected;

// Bytes of a block's scales in mode sm (see the header).
inline int64_t scale_bytes(int sm) { return sm == 0 ? 2 * PW * 4 : sm == 1 ? 2 * PW * 2 : PW * 2; }
// Bytes of a block's integers (16 features x B inputs of `fmt` bits).
inline int64_t int_bytes(int fmt, int64_t B) { return fmt == 8 ? B * PW : B * PW / 2; }

inline float half_to_f32(uint16_t h) { return float(c10::Half(h, c10::Half::from_bits())); }

// A block's d[16] and m[16] as fp32 (dm: the bytes after the block's integers).
inline void scales_scalar(const uint8_t* dm, int sm, float* d, float* m) {
  if (sm == 0) {
    std::memcpy(d, dm, PW * 4);
    std::memcpy(m, dm + PW * 4, PW * 4);
    return;
  }
  const uint16_t* h = reinterpret_cast<const uint16_t*>(dm);
  for (int j = 0; j < PW; ++j) {
    d[j] = half_to_f32(h[j]);
    m[j] = sm == 1 ? half_to_f32(h[PW + j]) : 0.f;
  }
}

// Quantized activations of M rows: qx [M][K] int8, dx / xs [M][K/B], and is [M][K/B] = sum(qx)
// per block (the VNNI path's offset correction).
struct QRows {
  std::vector<int8_t> q;
  std::vector<float> d, s;
  std::vector<int32_t> is;
  int64_t K = 0, nb = 0;
};

// Rows m0.. of quantized activations, as the panels read them.
struct QView {
  const int8_t* q;
  const float* d;
  const float* s;
  const int32_t* is;
  int64_t K;
};

inline QView rows_from(const QRows& r, int64_t m0) {
  return {r.q.data() + m0 * r.K, r.d.data() + m0 * r.nb, r.s.data() + m0 * r.nb, r.is.data() + m0 * r.nb, r.K};
}

template <typename T>
inline float to_f32(T v);
template <> inline float to_f32<float>(float v) { return v; }
template <> inline float to_f32<uint16_t>(uint16_t v) { return float(c10::BFloat16(v, c10::BFloat16::from_bits())); }

// One block of B activations (fp32) quantized as the header defines it: dst = round(x / dx) (ties to
// even, as nearbyint), dx = max|x| / 127; returns sum(dst) and sets dx. The AVX2 form gives the same
// bits (IEEE division and rounding, the max is exact in any order).
inline int32_t quantize_block_scalar(const float* src, int64_t B, int8_t* dst, float* dx_out) {
  float amax = 0.f;
  for (int64_t i = 0; i < B; ++i) amax = std::max(amax, std::fabs(src[i]));
  const float dx = amax / 127.0f;
  int32_t sum = 0;
  for (int64_t i = 0; i < B; ++i) {
    const int32_t v = dx == 0.f ? 0 : int32_t(std::nearbyint(src[i] / dx));
    dst[i] = int8_t(std::max(-127, std::min(127, v)));
    sum += dst[i];
  }
  *dx_out = dx;
  return sum;
}

__attribute__((target("avx2,fma,f16c"))) inline int32_t quantize_block_avx2(const float* src, int64_t B, int8_t* dst,
                                                                         float* dx_out) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 mx = _mm256_setzero_ps();
  for (int64_t i = 0; i < B; i += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(src + i)));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  const float dx = _mm_cvtss_f32(m4) / 127.0f;
  *dx_out = dx;
  if (dx == 0.f) {
    std::memset(dst, 0, size_t(B));
    return 0;
  }
  const __m256 dv = _mm256_set1_ps(dx);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  __m256i sum = _mm256_setzero_si256();
  for (int64_t i = 0; i < B; i += 8) {
    const __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(src + i), dv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i v = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(q), lo), hi);
    sum = _mm256_add_epi32(sum, v);
    const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    const int64_t b8 = _mm_cvtsi128_si64(_mm_packs_epi16(w16, w16));
    std::memcpy(dst + i, &b8, 8);
  }
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
  return _mm_cvtsi128_si32(s4);
}

// Quantized activations of M rows into r (its buffers are reused: a decode step quantizes ~120
// activations, and allocating them cost more than the quantization).
template <typename T>
void quantize_rows(const T* x, int64_t ldx, int64_t M, int64_t K, int64_t B, QRows& r) {
  TORCH_CHECK(B > 0 && B <= 64 && K % B == 0, "quantize_rows: blocks of 1..64 inputs dividing K");
  r.K = K;
  r.nb = K / B;
  r.q.resize(size_t(M * K));
  r.d.resize(size_t(M * r.nb));
  r.s.resize(size_t(M * r.nb));
  r.is.resize(size_t(M * r.nb));
  const bool simd = q_isa != Q_SCALAR && B % 8 == 0;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));  // rows: ~16K values per task
  at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
    float buf[64];
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t b = 0; b < r.nb; ++b) {
        const T* src = x + m * ldx + b * B;
        const float* f;
        if constexpr (std::is_same_v<T, float>) {
          f = src;
        } else {
          for (int64_t i = 0; i < B; ++i) buf[i] = to_f32<T>(src[i]);
          f = buf;
        }
        int8_t* dst = r.q.data() + m * K + b * B;
        float dx;
        const int32_t sum = simd ? quantize_block_avx2(f, B, dst, &dx) : quantize_block_scalar(f, B, dst, &dx);
        r.d[m * r.nb + b] = dx;
        r.s[m * r.nb + b] = dx * float(sum);
        r.is[m * r.nb + b] = sum;
      }
    }
  });
}

template <typename T>
QRows quantize_rows(const T* x, int64_t ldx, int64_t M, int64_t K, int64_t B) {
  QRows r;
  quantize_rows<T>(x, ldx, M, K, B, r);
  return r;
}

// ---- integer block dots: sums[j] = sum_k q[j][k] * qx[k] over one block, for the 16 features ----

// Portable: fmt 8 blocks (B/4 groups of [16][4] int8) and fmt 4 blocks (B/8 groups of [16][4] nibbles).
inline void dot_block_scalar(const uint8_t* w, const int8_t* qx, int fmt, int B, int32_t* sums) {
  for (int j = 0; j < PW; ++j) sums[j] = 0;
  if (fmt == 8) {
    const int8_t* q = reinterpret_cast<const int8_t*>(w);
    for (int g = 0; g < B / 4; ++g)
      for (int j = 0; j < PW; ++j)
        for (int i = 0; i < 4; ++i) sums[j] += int32_t(q[(g * PW + j) * 4 + i]) * qx[4 * g + i];
  } else {
    for (int g = 0; g < B / 8; ++g)
      for (int j = 0; j < PW; ++j)
        for (int i = 0; i < 4; ++i) {
          const uint8_t v = w[(g * PW + j) * 4 + i];
          sums[j] += int32_t(v & 15) * qx[8 * g + i] + int32_t(v >> 4) * qx[8 * g + 4 + i];
        }
  }
}

inline void finish_block_scalar(const int32_t* sums, const float* d, const float* m, bool has_m, float dx, float xs,
                                float* acc) {
  for (int j = 0; j < PW; ++j) {
    acc[j] = std::fma(float(sums[j]), d[j] * dx, acc[j]);
    if (has_m) acc[j] = std::fma(m[j], xs, acc[j]);
  }
}

// AVX2: one block of 16 features, unpacked once per block into `u` (u8 operands of maddubs:
// the nibbles, or |w| for int8 weights) and `sg` (the int8 weights, for sign(x, w)); then per row.
struct Avx2Block {
  __m256i u[16];
  __m256i sg[16];
};

__attribute__((target("avx2,fma,f16c"))) inline void unpack_block_avx2(const uint8_t* w, int fmt, int B, Avx2Block& blk) {
  if (fmt == 4) {
    const __m256i lo = _mm256_set1_epi8(15);
    for (int g = 0; g < B / 8; ++g)
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 64 + h * 32));
        blk.u[(2 * g) * 2 + h] = _mm256_and_si256(v, lo);                         // k = 8g + 0..3
        blk.u[(2 * g + 1) * 2 + h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo);  // k = 8g + 4..7
      }
  } else {
    for (int g = 0; g < B / 4; ++g)
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 64 + h * 32));
        blk.sg[g * 2 + h] = v;
        blk.u[g * 2 + h] = _mm256_sign_epi8(v, v);  // |w| (w = -128 gives 0x80 = 128 as u8)
      }
  }
}

// One group of 4 inputs of int8 weights (|w| in u0 / u1, w in g0 / g1; features 0-7 / 8-15) for R
// rows: s0[r], s1[r] += the group's int32 dot products, via |w| x sign(x, w).
template <int R>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void int8_group_rows(
    __m256i u0, __m256i u1, __m256i g0, __m256i g1, const int8_t* const* qx, int g, __m256i* s0, __m256i* s1) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int r = 0; r < R; ++r) {
    int32_t x4;
    std::memcpy(&x4, qx[r] + 4 * g, 4);
    const __m256i xb = _mm256_set1_epi32(x4);
    s0[r] = _mm256_add_epi32(s0[r], _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_sign_epi8(xb, g0)), ones));
    s1[r] = _mm256_add_epi32(s1[r], _mm256_madd_epi16(_mm256_maddubs_epi16(u1, _mm256_sign_epi8(xb, g1)), ones));
  }
}

// int32 sums of the block for features 0..7 (s0[r]) and 8..15 (s1[r]) of R rows at once (qx[r]: B
// int8 of row r): each unpacked weight register is loaded once for the R rows. The sums are exact,
// so R never changes a result.
template <int R>
__attribute__((target("avx2,fma,f16c"))) inline void dot_block_avx2(const Avx2Block& blk, const int8_t* const* qx, int fmt,
                                                           int B, __m256i* s0, __m256i* s1) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int G = B / 4;  // groups of 4 inputs
  if (fmt == 4) {
    // |u * x| <= 15 * 127: 16 products per int16 lane (8 groups x 2) stay below 32767
    __m256i a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_si256();
    for (int g = 0; g < G; ++g) {
      const __m256i u0 = blk.u[g * 2], u1 = blk.u[g * 2 + 1];
      for (int r = 0; r < R; ++r) {
        int32_t x4;
        std::memcpy(&x4, qx[r] + 4 * g, 4);
        const __m256i xb = _mm256_set1_epi32(x4);
        a0[r] = _mm256_add_epi16(a0[r], _mm256_maddubs_epi16(u0, xb));
        a1[r] = _mm256_add_epi16(a1[r], _mm256_maddubs_epi16(u1, xb));
      }
    }
    for (int r = 0; r < R; ++r) {
      s0[r] = _mm256_madd_epi16(a0[r], ones);
      s1[r] = _mm256_madd_epi16(a1[r], ones);
    }
  } else {
    // |w| * |x| <= 128 * 127: one pair per int16 lane, widened to int32 every group
    for (int r = 0; r < R; ++r) s0[r] = s1[r] = _mm256_setzero_si256();
    for (int g = 0; g < G; ++g) {
      const __m256i u0 = blk.u[g * 2], u1 = blk.u[g * 2 + 1], g0 = blk.sg[g * 2], g1 = blk.sg[g * 2 + 1];
      int8_group_rows<R>(u0, u1, g0, g1, qx, g, s0, s1);
    }
  }
}

// Rows m .. m + R - 1 of one block, from their int32 sums (features 0-7 in s0[r], 8-15 in s1[r]):
// acc[m][16] += d * dx * sums (+ m * xs), per row as for one row.
template <int SM, int R>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void finish_rows_avx2(const __m256i* s0, const __m256i* s1,
                                                             const QView& xr, int64_t m, int64_t b, int64_t nb,
                                                             __m256 d0, __m256 d1, __m256 m0, __m256 m1, float* acc) {
  for (int r = 0; r < R; ++r) {
    const __m256 dx = _mm256_set1_ps(xr.d[(m + r) * nb + b]);
    const __m256 xs = _mm256_set1_ps(xr.s[(m + r) * nb + b]);
    float* a = acc + (m + r) * PW;
    __m256 a0 = _mm256_loadu_ps(a), a1 = _mm256_loadu_ps(a + 8);
    a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0[r]), _mm256_mul_ps(d0, dx), a0);
    a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1[r]), _mm256_mul_ps(d1, dx), a1);
    if (SM != 2) {
      a0 = _mm256_fmadd_ps(m0, xs, a0);
      a1 = _mm256_fmadd_ps(m1, xs, a1);
    }
    _mm256_storeu_ps(a, a0);
    _mm256_storeu_ps(a + 8, a1);
  }
}

// Rows m .. m + R - 1 of one unpacked block.
template <int SM, int R>
__attribute__((target("avx2,fma,f16c"))) inline void block_rows_avx2(const Avx2Block& blk, const QView& xr, int64_t m,
                                                            int64_t b, int64_t nb, int fmt, int B, __m256 d0,
                                                            __m256 d1, __m256 m0, __m256 m1, float* acc) {
  const int8_t* qx[R];
  for (int r = 0; r < R; ++r) qx[r] = xr.q + (m + r) * xr.K + b * B;
  __m256i s0[R], s1[R];
  dot_block_avx2<R>(blk, qx, fmt, B, s0, s1);
  finish_rows_avx2<SM, R>(s0, s1, xr, m, b, nb, d0, d1, m0, m1, acc);
}

// Few rows, streamed: R <= 3 rows' int32 sums of one block (as dot_block_avx2 gives them), each
// 32-byte load of weights fed straight to maddubs (4-bit: split into its nibbles on the way) with
// nothing unpacked to the stack (Avx2Block's 16 registers spill: at 1-3 rows the spills cost more
// than the arithmetic). The same exact integer sums, so the results are bit-identical. These
// helpers must inline into panel_avx2 (always_inline): called out of line, passing the __m256
// scales cost 1.2x at one row.
template <int FMT, int R>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void dot_block_stream_avx2(const uint8_t* w, const int8_t* const* qx,
                                                                  int B, __m256i* s0, __m256i* s1) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (FMT == 4) {  // B = 32; int16 sums as in dot_block_avx2
    const __m256i lo = _mm256_set1_epi8(15);
    __m256i a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_si256();
    for (int g = 0; g < 4; ++g) {  // 64 bytes: inputs 8g + 0..3 (low nibbles), 8g + 4..7 (high); features 0-7 | 8-15
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 64));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 64 + 32));
      const __m256i l0 = _mm256_and_si256(v0, lo), l1 = _mm256_and_si256(v1, lo);
      const __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), lo), h1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), lo);
      for (int r = 0; r < R; ++r) {
        int32_t xl, xh;
        std::memcpy(&xl, qx[r] + 8 * g, 4);
        std::memcpy(&xh, qx[r] + 8 * g + 4, 4);
        const __m256i bl = _mm256_set1_epi32(xl), bh = _mm256_set1_epi32(xh);
        a0[r] = _mm256_add_epi16(a0[r], _mm256_add_epi16(_mm256_maddubs_epi16(l0, bl), _mm256_maddubs_epi16(h0, bh)));
        a1[r] = _mm256_add_epi16(a1[r], _mm256_add_epi16(_mm256_maddubs_epi16(l1, bl), _mm256_maddubs_epi16(h1, bh)));
      }
    }
    for (int r = 0; r < R; ++r) {
      s0[r] = _mm256_madd_epi16(a0[r], ones);
      s1[r] = _mm256_madd_epi16(a1[r], ones);
    }
    return;
  }
  for (int r = 0; r < R; ++r) s0[r] = s1[r] = _mm256_setzero_si256();
  for (int g = 0; g < B / 4; ++g) {  // int8, 64 bytes: [16 features][inputs 4g + 0..3]; features 0-7 | 8-15
    const __m256i g0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 64));
    const __m256i g1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * 64 + 32));
    const __m256i u0 = _mm256_sign_epi8(g0, g0), u1 = _mm256_sign_epi8(g1, g1);  // |w| (see unpack_block_avx2)
    int8_group_rows<R>(u0, u1, g0, g1, qx, g, s0, s1);
  }
}

// Rows m .. m + R - 1 of one streamed block.
template <int SM, int FMT, int R>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void block_rows_stream_avx2(const uint8_t* w, const QView& xr,
                                                                   int64_t m, int64_t b, int64_t nb, int B, __m256 d0,
                                                                   __m256 d1, __m256 m0, __m256 m1, float* acc) {
  const int8_t* qx[R];
  for (int r = 0; r < R; ++r) qx[r] = xr.q + (m + r) * xr.K + b * B;
  __m256i s0[R], s1[R];
  dot_block_stream_avx2<FMT, R>(w, qx, B, s0, s1);
  finish_rows_avx2<SM, R>(s0, s1, xr, m, b, nb, d0, d1, m0, m1, acc);
}

// All M rows of one streamed block: 3 rows at a time, then 2 (4 rows = 2 + 2), then 1.
template <int SM, int FMT>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void block_stream_avx2(const uint8_t* w, const QView& xr, int64_t M,
                                                              int64_t b, int64_t nb, int B, __m256 d0, __m256 d1,
                                                              __m256 m0, __m256 m1, float* acc) {
  int64_t m = 0;
  for (; M - m >= 3 && M - m != 4; m += 3) block_rows_stream_avx2<SM, FMT, 3>(w, xr, m, b, nb, B, d0, d1, m0, m1, acc);
  for (; M - m >= 2; m += 2) block_rows_stream_avx2<SM, FMT, 2>(w, xr, m, b, nb, B, d0, d1, m0, m1, acc);
  if (m < M) block_rows_stream_avx2<SM, FMT, 1>(w, xr, m, b, nb, B, d0, d1, m0, m1, acc);
}

// One panel for all M rows: acc [M][16] fp32. Few rows stream each block (kStreamRows4/8, up to
// 3 rows at a time); more rows unpack it once: from 8 rows on, 4-bit weights then go 4 rows at a
// time (the 16 vector registers hold 4 rows' sums: 1.1-1.3x at 16-2048 rows), the rest one row
// at a time.
template <int SM>
__attribute__((target("avx2,fma,f16c"))) void panel_avx2(const uint8_t* wp, int64_t nb, int64_t qbytes, int fmt, int B,
                                                const QView& xr, int64_t M, float* acc) {
  Avx2Block blk;
  const int64_t bbytes = qbytes + scale_bytes(SM);
  const int64_t ahead = std::max<int64_t>(1, kPrefetchBytes / bbytes) * bbytes;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* w = wp + b * bbytes;
    const char* f = reinterpret_cast<const char*>(w + ahead);  // see kPrefetchBytes
    for (int64_t o = 0; o < bbytes; o += 64) _mm_prefetch(f + o, _MM_HINT_T0);
    __m256 d0, d1, m0, m1;
    if (SM == 0) {
      const float* dm = reinterpret_cast<const float*>(w + qbytes);
      d0 = _mm256_loadu_ps(dm), d1 = _mm256_loadu_ps(dm + 8);
      m0 = _mm256_loadu_ps(dm + PW), m1 = _mm256_loadu_ps(dm + PW + 8);
    } else {
      const __m128i* h = reinterpret_cast<const __m128i*>(w + qbytes);
      d0 = _mm256_cvtph_ps(_mm_loadu_si128(h)), d1 = _mm256_cvtph_ps(_mm_loadu_si128(h + 1));
      m0 = m1 = _mm256_setzero_ps();
      if (SM == 1) m0 = _mm256_cvtph_ps(_mm_loadu_si128(h + 2)), m1 = _mm256_cvtph_ps(_mm_loadu_si128(h + 3));
    }
    if (fmt == 4 && M <= kStreamRows4) {
      block_stream_avx2<SM, 4>(w, xr, M, b, nb, B, d0, d1, m0, m1, acc);
      continue;
    }
    if (fmt == 8 && M <= kStreamRows8) {
      block_stream_avx2<SM, 8>(w, xr, M, b, nb, B, d0, d1, m0, m1, acc);
      continue;
    }
    unpack_block_avx2(w, fmt, B, blk);
    int64_t m = 0;
    if (fmt == 4 && M >= 8)
      for (; m + 4 <= M; m += 4) block_rows_avx2<SM, 4>(blk, xr, m, b, nb, fmt, B, d0, d1, m0, m1, acc);
    for (; m < M; ++m) block_rows_avx2<SM, 1>(blk, xr, m, b, nb, fmt, B, d0, d1, m0, m1, acc);
  }
}

// AVX-512 VNNI: one panel for R <= 8 rows. A block's groups are loaded once as u8 operands (the
// nibbles, or the int8 weights + 128) and reused by every row; u[g] pairs with qx[4g .. 4g + 3].
// The rows' fp32 accumulators stay in registers for the whole panel, and each block's dot product
// runs as two independent vpdpbusd chains (the int32 sums are exact: their order changes nothing).
// The weight stream is prefetched ~kVnniPrefetchBytes ahead: at 1-8 rows, the default model's
// matmuls ran 1.3x faster with registers and split chains than with accumulators in memory and
// one chain (4 blocks ahead), and another 1.4-1.5x from 4 to 24 blocks (~8 KB) ahead (2 threads,
// every weight of the model in turn, interleaved); 12-64 blocks were within noise.
constexpr int64_t kVnniPrefetchBytes = 8192;
// GCC 12 flags the undefined pass-through operand of its own _mm512_cvtepi32_ps / _mm512_cvtph_ps
// (_mm512_undefined_ps) as maybe uninitialized once these are inlined into the templates below.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <int SM, int FMT, int G, int R>
__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c"))) void panel_vnni_r(
    const uint8_t* wp, int64_t nb, int64_t qbytes, const QView& xr, float* acc) {
  constexpr int B = 4 * G;
  const int64_t bbytes = qbytes + scale_bytes(SM);
  const int64_t ahead = std::max<int64_t>(1, kVnniPrefetchBytes / bbytes) * bbytes;
  const __m512i lo = _mm512_set1_epi8(15), offset = _mm512_set1_epi8(char(0x80));
  __m512 av[R];
  for (int r = 0; r < R; ++r) av[r] = _mm512_loadu_ps(acc + r * PW);
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* w = wp + b * bbytes;
    const char* f = reinterpret_cast<const char*>(w + ahead);
    for (int64_t o = 0; o < bbytes; o += 64) _mm_prefetch(f + o, _MM_HINT_T0);
    __m512i u[G];
    if (FMT == 4) {
      for (int g = 0; g < G / 2; ++g) {  // 64 bytes hold inputs 8g + 0..3 (low nibbles) and 8g + 4..7 (high)
        const __m512i v = _mm512_loadu_si512(w + g * 64);
        u[2 * g] = _mm512_and_si512(v, lo);
        u[2 * g + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo);
      }
    } else {
      for (int g = 0; g < G; ++g) u[g] = _mm512_xor_si512(_mm512_loadu_si512(w + g * 64), offset);  // w + 128 as u8
    }
    __m512 d, mv = _mm512_setzero_ps();
    if (SM == 0) {
      const float* dm = reinterpret_cast<const float*>(w + qbytes);
      d = _mm512_loadu_ps(dm);
      mv = _mm512_loadu_ps(dm + PW);
    } else {
      const __m256i* h = reinterpret_cast<const __m256i*>(w + qbytes);
      d = _mm512_cvtph_ps(_mm256_loadu_si256(h));
      if (SM == 1) mv = _mm512_cvtph_ps(_mm256_loadu_si256(h + 1));
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* qx = xr.q + r * xr.K + b * B;
      __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
      for (int g = 0; g < G; g += 2) {
        int32_t x0, x1;
        std::memcpy(&x0, qx + 4 * g, 4);
        std::memcpy(&x1, qx + 4 * g + 4, 4);
        s0 = _mm512_dpbusd_epi32(s0, u[g], _mm512_set1_epi32(x0));
        s1 = _mm512_dpbusd_epi32(s1, u[g + 1], _mm512_set1_epi32(x1));
      }
      __m512i s = _mm512_add_epi32(s0, s1);
      if (FMT == 8) s = _mm512_sub_epi32(s, _mm512_set1_epi32(128 * xr.is[r * nb + b]));
      av[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, _mm512_set1_ps(xr.d[r * nb + b])), av[r]);
      if (SM != 2) av[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(xr.s[r * nb + b]), av[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(acc + r * PW, av[r]);
}

template <int SM, int FMT, int G>
void panel_vnni_rows(const uint8_t* wp, int64_t nb, int64_t qbytes, const QView& xr, int64_t R, float* acc) {
  switch (R) {
    case 1: panel_vnni_r<SM, FMT, G, 1>(wp, nb, qbytes, xr, acc); break;
    case 2: panel_vnni_r<SM, FMT, G, 2>(wp, nb, qbytes, xr, acc); break;
    case 3: panel_vnni_r<SM, FMT, G, 3>(wp, nb, qbytes, xr, acc); break;
    case 4: panel_vnni_r<SM, FMT, G, 4>(wp, nb, qbytes, xr, acc); break;
    case 5: panel_vnni_r<SM, FMT, G, 5>(wp, nb, qbytes, xr, acc); break;
    case 6: panel_vnni_r<SM, FMT, G, 6>(wp, nb, qbytes, xr, acc); break;
    case 7: panel_vnni_r<SM, FMT, G, 7>(wp, nb, qbytes, xr, acc); break;
    default: panel_vnni_r<SM, FMT, G, 8>(wp, nb, qbytes, xr, acc); break;
  }
}

// All M rows of one panel, 8 at a time (the panel's later passes read it from L1 / L2).
template <int SM>
void panel_vnni(const uint8_t* wp, int64_t nb, int64_t qbytes, int fmt, int B, const QView& xr, int64_t M,
                float* acc) {
  for (int64_t m = 0; m < M; m += 8) {
    const QView v = {xr.q + m * xr.K, xr.d + m * nb, xr.s + m * nb, xr.is + m * nb, xr.K};
    const int64_t R = std::min<int64_t>(8, M - m);
    if (fmt == 4)
      panel_vnni_rows<SM, 4, 8>(wp, nb, qbytes, v, R, acc + m * PW);
    else if (B == 32)
      panel_vnni_rows<SM, 8, 8>(wp, nb, qbytes, v, R, acc + m * PW);
    else
      panel_vnni_rows<SM, 8, 4>(wp, nb, qbytes, v, R, acc + m * PW);
  }
}
#pragma GCC diagnostic pop

void panel_scalar(const uint8_t* wp, int64_t nb, int64_t qbytes, int fmt, int B, int sm, const QView& xr, int64_t M,
                  float* acc) {
  int32_t sums[PW];
  float d[PW], mm[PW];
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* w = wp + b * (qbytes + scale_bytes(sm));
    scales_scalar(w + qbytes, sm, d, mm);
    for (int64_t m = 0; m < M; ++m) {
      dot_block_scalar(w, xr.q + m * xr.K + b * B, fmt, B, sums);
      finish_block_scalar(sums, d, mm, sm != 2, xr.d[m * nb + b], xr.s[m * nb + b], acc + m * PW);
    }
  }
}

template <typename T>
void store(const float* acc, int64_t M, T* y, int64_t N, int64_t n0, int nn, const float* bias);

template <>
void store<float>(const float* acc, int64_t M, float* y, int64_t N, int64_t n0, int nn, const float* bias) {
  for (int64_t m = 0; m < M; ++m)
    for (int j = 0; j < nn; ++j) y[m * N + n0 + j] = acc[m * PW + j] + (bias ? bias[n0 + j] : 0.f);
}

template <>
void store<uint16_t>(const float* acc, int64_t M, uint16_t* y, int64_t N, int64_t n0, int nn, const float* bias) {
  for (int64_t m = 0; m < M; ++m)
    for (int j = 0; j < nn; ++j) y[m * N + n0 + j] = c10::BFloat16(acc[m * PW + j] + (bias ? bias[n0 + j] : 0.f)).x;
}

template <typename T>
void run(const T* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t N, int64_t K, int fmt, int B, int sm,
         T* y, const float* bias) {
  // The calling thread's buffers, reused; the tasks below must read them through this reference
  // (naming the thread_local inside a task would give that worker thread's own).
  thread_local QRows buffers;
  QRows& xr = buffers;
  quantize_rows<T>(x, ldx, M, K, B, xr);
  const int64_t nb = K / B;
  const int64_t qbytes = int_bytes(fmt, B);
  const int64_t panel_bytes = nb * (qbytes + scale_bytes(sm));
  const int64_t P = (N + PW - 1) / PW;
  const int64_t grain = std::max<int64_t>(1, (32 * 1024) / panel_bytes);  // >= ~32 KB of weights per task
  const QIsa isa = q_isa;
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    // Rows go MC at a time through all of this task's panels: a chunk's activations stay in cache
    // while the panels' weights stream past, and its accumulators fit in L1.
    std::vector<float> acc(size_t(std::min<int64_t>(M, MC) * PW));
    for (int64_t r0 = 0; r0 < M; r0 += MC) {
      const int64_t mc = std::min<int64_t>(MC, M - r0);
      const QView xv = rows_from(xr, r0);
      for (int64_t p = p0; p < p1; ++p) {
        std::fill(acc.begin(), acc.begin() + mc * PW, 0.f);
        const uint8_t* wp = w + p * panel_bytes;
        if (isa == Q_SCALAR)
          panel_scalar(wp, nb, qbytes, fmt, B, sm, xv, mc, acc.data());
        else if (isa == Q_VNNI)
          (sm == 0 ? panel_vnni<0> : sm == 1 ? panel_vnni<1> : panel_vnni<2>)(wp, nb, qbytes, fmt, B, xv, mc, acc.data());
        else if (sm == 0)
          panel_avx2<0>(wp, nb, qbytes, fmt, B, xv, mc, acc.data());
        else if (sm == 1)
          panel_avx2<1>(wp, nb, qbytes, fmt, B, xv, mc, acc.data());
        else
          panel_avx2<2>(wp, nb, qbytes, fmt, B, xv, mc, acc.data());
        store<T>(acc.data(), mc, y + r0 * N, N, p * PW, int(std::min<int64_t>(PW, N - p * PW)), bias);
      }
    }
  });
}

}  // namespace

// The raw fp32 form, for other kernels of the extension (quant_block.cpp): y [M, N] (row stride N).
void quant_gemm_f32(const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t N, int64_t K, int fmt, int B,
                    int sm, float* y, const float* bias) {
  run<float>(x, ldx, M, w, N, K, fmt, B, sm, y, bias);
}

// The same for bf16 activations and outputs (raw bits): the quantized MTP drafter layer (skinny_gemm.cpp).
void quant_gemm_bf16(const uint16_t* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t N, int64_t K, int fmt, int B,
                     int sm, uint16_t* y, const float* bias) {
  run<uint16_t>(x, ldx, M, w, N, K, fmt, B, sm, y, bias);
}

// Bytes of a packed quantized weight [N, K] (fmt bits, blocks of B inputs, scale mode sm).
int64_t quant_packed_bytes(int64_t N, int64_t K, int fmt, int B, int sm) {
  return (N + PW - 1) / PW * (K / B) * (int_bytes(fmt, B) + scale_bytes(sm));
}

// Whether `packed` is a quantized weight the kernel runs, described by meta = [N, K, bits, block,
// scale mode]: a supported format, a contiguous uint8 CPU tensor of the packed size, and N / K as
// wanted (-1: any). The one-call kernels (quant_block.cpp, skinny_gemm.cpp) check their inputs with it.
bool quant_weight_ok(const torch::Tensor& packed, const std::vector<int64_t>& m, int64_t want_n, int64_t want_k) {
  return m.size() == 5 && (want_n < 0 || m[0] == want_n) && (want_k < 0 || m[1] == want_k) &&
         ((m[2] == 4 && m[3] == 32) || (m[2] == 8 && (m[3] == 16 || m[3] == 32))) && m[4] >= 0 && m[4] <= 2 &&
         m[1] % m[3] == 0 && packed.scalar_type() == torch::kUInt8 && packed.is_contiguous() && packed.device().is_cpu() &&
         packed.numel() == quant_packed_bytes(m[0], m[1], int(m[2]), int(m[3]), int(m[4]));
}

// x [M, K] fp32 or bf16 (unit inner stride); packed: uint8, see header; bias: fp32 [N] or None.
torch::Tensor quant_linear(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias,
                           int64_t N, int64_t K, int64_t fmt, int64_t B, int64_t sm) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.stride(1) == 1, "quant_linear: x must be [M, K] with unit inner stride");
  TORCH_CHECK(sm >= 0 && sm <= 2, "quant_linear: scale mode must be 0, 1 or 2");
  TORCH_CHECK(fmt == 4 || fmt == 8, "quant_linear: fmt must be 4 or 8");
  TORCH_CHECK((fmt == 4 && B == 32) || (fmt == 8 && (B == 16 || B == 32)), "quant_linear: unsupported block size");
  TORCH_CHECK(K % B == 0, "quant_linear: K must be a multiple of the block size");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.is_contiguous(), "quant_linear: packed must be contiguous uint8");
  TORCH_CHECK(packed.numel() == quant_packed_bytes(N, K, int(fmt), int(B), int(sm)),
              "quant_linear: packed size does not match N, K");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == N,
                "quant_linear: bias must be fp32 [N]");
  const int64_t M = x.size(0);
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* bp = has_bias ? bias->data_ptr<float>() : nullptr;
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  if (x.scalar_type() == torch::kFloat32) {
    run<float>(x.data_ptr<float>(), x.stride(0), M, wp, N, K, int(fmt), int(B), int(sm), y.data_ptr<float>(), bp);
  } else if (x.scalar_type() == torch::kBFloat16) {
    run<uint16_t>(reinterpret_cast<const uint16_t*>(x.data_ptr()), x.stride(0), M, wp, N, K, int(fmt), int(B), int(sm),
                  reinterpret_cast<uint16_t*>(y.data_ptr()), bp);
  } else {
    TORCH_CHECK(false, "quant_linear: x must be float32 or bfloat16");
  }
  return y;
}

// Row n of a packed weight [N, K], dequantized (d * q + m, fp32) into out[K]: a tied or quantized
// embedding's lookup (quant_rows below, and QuantStack.step in quant_block.cpp).
void quant_row_f32(const uint8_t* wp, int64_t K, int fmt, int B, int sm, int64_t n, float* out) {
  const int64_t nb = K / B;
  const int64_t qbytes = int_bytes(fmt, B);
  const int64_t block_bytes = qbytes + scale_bytes(sm);
  const int64_t p = n / PW, j = n % PW;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* w = wp + (p * nb + b) * block_bytes;
    float ds[PW], ms[PW];
    scales_scalar(w + qbytes, sm, ds, ms);
    const float d = ds[j], m = ms[j];
    float* o = out + b * B;
    if (fmt == 8) {
      const int8_t* q = reinterpret_cast<const int8_t*>(w);
      for (int64_t g = 0; g < B / 4; ++g)
        for (int i = 0; i < 4; ++i) o[4 * g + i] = d * float(q[(g * PW + j) * 4 + i]) + m;
    } else {
      for (int64_t g = 0; g < B / 8; ++g)
        for (int i = 0; i < 4; ++i) {
          const uint8_t v = w[(g * PW + j) * 4 + i];
          o[8 * g + i] = d * float(v & 15) + m;
          o[8 * g + 4 + i] = d * float(v >> 4) + m;
        }
    }
  }
}

// Rows `ids` of a packed weight, dequantized (quant_row_f32).
torch::Tensor quant_rows(const torch::Tensor& packed, const torch::Tensor& ids, int64_t N, int64_t K, int64_t fmt,
                         int64_t B, int64_t sm) {
  TORCH_CHECK(sm >= 0 && sm <= 2, "quant_rows: scale mode must be 0, 1 or 2");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.is_contiguous(), "quant_rows: packed must be contiguous uint8");
  TORCH_CHECK(ids.scalar_type() == torch::kLong, "quant_rows: ids must be int64");
  TORCH_CHECK((fmt == 4 && B == 32) || (fmt == 8 && (B == 16 || B == 32)), "quant_rows: unsupported format");
  TORCH_CHECK(packed.numel() == quant_packed_bytes(N, K, int(fmt), int(B), int(sm)),
              "quant_rows: packed size does not match N, K");
  const auto flat = ids.contiguous().view(-1);
  const int64_t R = flat.numel();
  const int64_t* ip = flat.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(ip[r] >= 0 && ip[r] < N, "quant_rows: id ", ip[r], " out of range");
  auto out = torch::empty({R, K}, torch::kFloat32);
  float* op = out.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  for (int64_t r = 0; r < R; ++r) quant_row_f32(wp, K, int(fmt), int(B), int(sm), ip[r], op + r * K);
  return out;
}

// The int8 activations the kernel uses, for tests: (qx [M, K] int8, dx [M, K/B], xs [M, K/B]).
std::vector<torch::Tensor> quant_activations(const torch::Tensor& x, int64_t B) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat32 && x.size(1) % B == 0,
              "quant_activations: x must be contiguous fp32 [M, K], K a multiple of B");
  const int64_t M = x.size(0), K = x.size(1);
  const QRows r = quantize_rows<float>(x.data_ptr<float>(), K, M, K, B);
  auto q = torch::empty({M, K}, torch::kInt8);
  auto d = torch::empty({M, K / B}, torch::kFloat32);
  auto s = torch::empty({M, K / B}, torch::kFloat32);
  std::memcpy(q.data_ptr(), r.q.data(), r.q.size());
  std::memcpy(d.data_ptr(), r.d.data(), r.d.size() * 4);
  std::memcpy(s.data_ptr(), r.s.data(), r.s.size() * 4);
  return {q, d, s};
}

std::string quant_isa() { return q_isa == Q_VNNI ? "avx512vnni" : q_isa == Q_AVX2 ? "avx2" : "portable"; }

// 'portable', 'avx2' or 'auto' (the best this CPU has); never more than the CPU has.
std::string quant_force_isa(const std::string& name) {
  const QIsa want = name == "portable" ? Q_SCALAR : name == "avx2" ? Q_AVX2 : q_detected;
  q_isa = std::min(want, q_detected);
  return quant_isa();
}

void register_quant(pybind11::module& m) {
  m.def("quant_linear", &quant_linear, "y = x @ dequant(packed).T + bias, int8 activations (kernels/quant.py)");
  m.def("quant_rows", &quant_rows, "dequantized rows of a packed weight (embedding lookups)");
  m.def("quant_activations", &quant_activations, "the int8 activations quant_linear uses (tests)");
  m.def("quant_isa", &quant_isa, "quantized kernel path: avx512vnni, avx2 or portable");
  m.def("quant_force_isa", &quant_force_isa, "'portable', 'avx2' or 'auto' (tests)");
}
