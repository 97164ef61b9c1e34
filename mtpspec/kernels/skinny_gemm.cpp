// Skinny GEMM for decode/verify steps: y[M,N] = x[M,K] @ W^T (+ bias), M small.
//
// The weight is pre-packed (see mtpspec/kernels/__init__.py) into "panels" of
// 16 output features so that one weight vector load (64 bytes) feeds M FMAs
// and every thread streams one contiguous range of memory:
//
//   fp32 : P[N/16][K][16]        P[p][k][j]    = W[16p+j][k]
//   bf16 : P[N/16][K/2][16][2]   P[p][q][j][i] = W[16p+j][2q+i]   (K padded even)
//
// The bf16 layout is the operand layout of AVX512_BF16 `vdpbf16ps` (16 fp32
// lanes, each accumulating a pair of consecutive-k bf16 products), so the
// activations are broadcast as (x[2q], x[2q+1]) dword pairs. N is padded to a
// multiple of 16 with zero rows; padded outputs are simply not stored.
//
// Activations are transposed once per call to xt[k][m] (per chunk of MMAX
// rows) so the kernels broadcast from one pointer + constant offsets.
//
// Parallelism: at::parallel_for over panels (shares torch's OpenMP pool:
// the extension links libgomp.so.1, which resolves to torch's copy).
// For M > MMAX rows the panel loop is outermost, so each panel is read from
// DRAM once and re-used from L1/L2 for every chunk of MMAX rows (prefill).
//
// ISA: AVX-512F (+BF16 when available) or AVX2+FMA, chosen at runtime; the
// translation unit itself is compiled for baseline x86-64 and only the
// kernels carry `target` attributes.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <algorithm>
#include <cstring>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t PW = 16;  // panel width (output features per panel)

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round-to-nearest-even, like torch
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// Scalar epilogue (AVX2 path): acc rows of 16 floats -> y (+bias), nn valid lanes.
template <typename T>
inline void store_panel(const float* acc, int M, T* y, int64_t ldy, int nn, const T* bias) {
  for (int m = 0; m < M; ++m) {
    for (int j = 0; j < nn; ++j) {
      float v = acc[m * PW + j];
      if constexpr (std::is_same_v<T, float>) {
        if (bias) v += bias[j];
        y[m * ldy + j] = v;
      } else {
        if (bias) v += bf16_to_f32(bias[j]);
        y[m * ldy + j] = f32_to_bf16(v);
      }
    }
  }
}

// Accumulation order. A row's result must not depend on how many rows share the call: a verify
// step must reproduce decode steps bit for bit. So every row, whatever M, sums k in U = 4
// interleaved chains (chain u takes k = u mod 4 of the 4-aligned part, the tail goes to chain 0)
// combined as ((c0 + c1) + c2) + c3. The four chains hide the FMA latency of one-row calls. Rows
// are computed in groups of at most 6 (24 of the 32 zmm registers hold accumulators); a group
// re-reads the panel's weights from L1/L2, and each row's order stays the same for any M.
constexpr int kChains = 4;
constexpr int group_rows(int rem) { return rem <= 6 ? rem : rem <= 12 ? (rem + 1) / 2 : 6; }

// Calls group(OFF, G) (as integral constants) for the row groups of an M-row chunk, in order.
template <int M, int OFF = 0, typename F>
inline void for_row_groups(const F& group) {
  if constexpr (OFF < M) {
    constexpr int G = group_rows(M - OFF);
    group(std::integral_constant<int, OFF>{}, std::integral_constant<int, G>{});
    for_row_groups<M, OFF + G>(group);
  }
}

// The fixed combination of a row's chains (the order above).
__attribute__((target("avx512f"))) inline __m512 sum_chains(const __m512* c0, const __m512* c1, const __m512* c2,
                                                          const __m512* c3) {
  return _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(*c0, *c1), *c2), *c3);
}

// All kernels compute one panel for mc = M rows:  out[m][0..15] = sum_k x[m][k] W[16p+j][k].
// Activations arrive pre-transposed as xt[k][m] (fp32) or xt[q][m] (bf16 pairs
// as one uint32), so every broadcast is `xt + const` (no per-row pointers).
//
// Software prefetch (2 KB ahead) only pays off when the kernel is FMA-bound
// (>= 12 rows); for fewer rows the hardware prefetcher does better alone
// (measured: -20% at M=1, +15..25% at M=16).
constexpr int64_t kPrefetchBytes = 2048;
#ifndef MTP_PREFETCH_MIN_M
#define MTP_PREFETCH_MIN_M 12
#endif
template <int M> constexpr bool use_prefetch() { return M >= MTP_PREFETCH_MIN_M; }

// ----------------------------------------------------------------- AVX-512
// Epilogues: add bias, convert, store the nn valid lanes of one output row.
struct Out {  // where a panel's results go
  void* y;              // &y[m0][16p] (element type = weight type)
  int64_t ldy;          // row stride of y in elements
  const void* bias;     // &bias[16p] or nullptr
  int nn;               // valid outputs in this panel (16 except the last panel)
};

__attribute__((target("avx512f")))
inline void epilogue_f32(__m512 s, int m, const Out& o) {
  const __mmask16 k = __mmask16((1u << o.nn) - 1);
  if (o.bias) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(k, o.bias));
  _mm512_mask_storeu_ps(static_cast<float*>(o.y) + m * o.ldy, k, s);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
inline void epilogue_bf16(__m512 s, int m, const Out& o) {
  const __mmask16 k = __mmask16((1u << o.nn) - 1);
  if (o.bias) {
    const __m256i b = _mm256_maskz_loadu_epi16(k, o.bias);
    s = _mm512_add_ps(s, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
  }
  const __m256i r = (__m256i)_mm512_cvtneps_pbh(s);  // round-to-nearest-even
  _mm256_mask_storeu_epi16(static_cast<uint16_t*>(o.y) + m * o.ldy, k, r);
}

// Rows OFF..OFF+G-1 of an M-row chunk (xt[k][m], m < M).
template <int M, int OFF, int G>
__attribute__((target("avx512f")))
void f32_group_avx512(const float* xt, const float* w, int64_t K, const Out& o) {
  constexpr int U = kChains;
  __m512 acc[U][G];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) acc[u][g] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + U <= K; k += U) {
    if constexpr (use_prefetch<M>()) _mm_prefetch((const char*)(w + k * PW) + kPrefetchBytes, _MM_HINT_T0);
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const __m512 wv = _mm512_loadu_ps(w + (k + u) * PW);
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g)
        acc[u][g] = _mm512_fmadd_ps(_mm512_set1_ps(xt[(k + u) * M + OFF + g]), wv, acc[u][g]);
    }
  }
  for (; k < K; ++k) {
    const __m512 wv = _mm512_loadu_ps(w + k * PW);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g)
      acc[0][g] = _mm512_fmadd_ps(_mm512_set1_ps(xt[k * M + OFF + g]), wv, acc[0][g]);
  }
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g) {
    epilogue_f32(sum_chains(&acc[0][g], &acc[1][g], &acc[2][g], &acc[3][g]), OFF + g, o);
  }
}

template <int M>
void f32_panel_avx512(const float* xt, const float* w, int64_t K, const Out& o) {
  for_row_groups<M>([&](auto off, auto g) { f32_group_avx512<M, off.value, g.value>(xt, w, K, o); });
}

template <int M, int OFF, int G>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void bf16_group_avx512bf16(const uint32_t* xt, const uint16_t* w, int64_t K2, const Out& o) {
  constexpr int U = kChains;
  __m512 acc[U][G];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) acc[u][g] = _mm512_setzero_ps();
  int64_t q = 0;
  for (; q + U <= K2; q += U) {
    if constexpr (use_prefetch<M>()) _mm_prefetch((const char*)(w + q * 2 * PW) + kPrefetchBytes, _MM_HINT_T0);
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (q + u) * 2 * PW);
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) {
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(int(xt[(q + u) * M + OFF + g]));
        acc[u][g] = _mm512_dpbf16_ps(acc[u][g], xv, wv);
      }
    }
  }
  for (; q < K2; ++q) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + q * 2 * PW);
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(int(xt[q * M + OFF + g]));
      acc[0][g] = _mm512_dpbf16_ps(acc[0][g], xv, wv);
    }
  }
#pragma GCC unroll 8
  for (int g = 0; g < G; ++g) {
    epilogue_bf16(sum_chains(&acc[0][g], &acc[1][g], &acc[2][g], &acc[3][g]), OFF + g, o);
  }
}

template <int M>
void bf16_panel_avx512bf16(const uint32_t* xt, const uint16_t* w, int64_t K2, const Out& o) {
  for_row_groups<M>([&](auto off, auto g) { bf16_group_avx512bf16<M, off.value, g.value>(xt, w, K2, o); });
}

// ------------------------------------------------------------- AVX2 + FMA
// Panel = 2 ymm. bf16 pairs are widened with a shift (low half) and a mask
// (high half): a bf16 is exactly the top 16 bits of the fp32 it represents.
template <int M>
__attribute__((target("avx2,fma")))
void f32_panel_avx2(const float* xt, const float* w, int64_t K, float* out) {
  __m256 a0[M], a1[M];
  for (int m = 0; m < M; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(w + k * PW), w1 = _mm256_loadu_ps(w + k * PW + 8);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m256 xv = _mm256_broadcast_ss(xt + k * M + m);
      a0[m] = _mm256_fmadd_ps(xv, w0, a0[m]);
      a1[m] = _mm256_fmadd_ps(xv, w1, a1[m]);
    }
  }
  for (int m = 0; m < M; ++m) {
    _mm256_storeu_ps(out + m * PW, a0[m]);
    _mm256_storeu_ps(out + m * PW + 8, a1[m]);
  }
}

template <int M>
__attribute__((target("avx2,fma")))
void bf16_panel_avx2(const uint32_t* xt, const uint16_t* w, int64_t K2, float* out) {
  __m256 a0[M], a1[M];
  for (int m = 0; m < M; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
  const __m256i hi_mask = _mm256_set1_epi32(int(0xffff0000u));
  for (int64_t q = 0; q < K2; ++q) {
    const __m256i r0 = _mm256_loadu_si256((const __m256i*)(w + q * 2 * PW));
    const __m256i r1 = _mm256_loadu_si256((const __m256i*)(w + q * 2 * PW + PW));
    const __m256 lo0 = _mm256_castsi256_ps(_mm256_slli_epi32(r0, 16));
    const __m256 hi0 = _mm256_castsi256_ps(_mm256_and_si256(r0, hi_mask));
    const __m256 lo1 = _mm256_castsi256_ps(_mm256_slli_epi32(r1, 16));
    const __m256 hi1 = _mm256_castsi256_ps(_mm256_and_si256(r1, hi_mask));
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const uint32_t pair = xt[q * M + m];
      const __m256 xl = _mm256_set1_ps(bf16_to_f32(uint16_t(pair & 0xffffu)));
      const __m256 xh = _mm256_set1_ps(bf16_to_f32(uint16_t(pair >> 16)));
      a0[m] = _mm256_fmadd_ps(xh, hi0, _mm256_fmadd_ps(xl, lo0, a0[m]));
      a1[m] = _mm256_fmadd_ps(xh, hi1, _mm256_fmadd_ps(xl, lo1, a1[m]));
    }
  }
  for (int m = 0; m < M; ++m) {
    _mm256_storeu_ps(out + m * PW, a0[m]);
    _mm256_storeu_ps(out + m * PW + 8, a1[m]);
  }
}

// AVX2 kernels write a 16-float scratch row per m; store_panel does the epilogue.
template <typename E, typename T, void (*KERN)(const E*, const T*, int64_t, float*), int M>
void avx2_panel(const E* xt, const T* w, int64_t Kw, const Out& o) {
  alignas(64) float acc[M * PW];
  KERN(xt, w, Kw, acc);
  store_panel<T>(acc, M, static_cast<T*>(o.y), o.ldy, o.nn, static_cast<const T*>(o.bias));
}
template <int M> void f32_avx2_panel(const float* xt, const float* w, int64_t K, const Out& o) {
  avx2_panel<float, float, f32_panel_avx2<M>, M>(xt, w, K, o);
}
template <int M> void bf16_avx2_panel(const uint32_t* xt, const uint16_t* w, int64_t K, const Out& o) {
  avx2_panel<uint32_t, uint16_t, bf16_panel_avx2<M>, M>(xt, w, K, o);
}

// ------------------------------------------------------------ dispatch
// E: activation element (float, or uint32 = bf16 pair); T: weight/output element.
template <typename E, typename T>
using PanelFn = void (*)(const E*, const T*, int64_t, const Out&);

#define MTP_TABLE(NAME, E, T, FN)                                             \
  PanelFn<E, T> NAME(int m) {                                                 \
    static const PanelFn<E, T> t[] = {nullptr, FN<1>, FN<2>, FN<3>, FN<4>,       \
                                   FN<5>,   FN<6>, FN<7>, FN<8>, FN<9>,       \
                                   FN<10>,  FN<11>, FN<12>, FN<13>, FN<14>,   \
                                   FN<15>,  FN<16>};                          \
    return t[m];                                                              \
  }
MTP_TABLE(f32_avx512, float, float, f32_panel_avx512)
MTP_TABLE(bf16_avx512bf16, uint32_t, uint16_t, bf16_panel_avx512bf16)
#undef MTP_TABLE

PanelFn<float, float> f32_avx2(int m) {
  static const PanelFn<float, float> t[] = {nullptr, f32_avx2_panel<1>, f32_avx2_panel<2>,
                                            f32_avx2_panel<3>, f32_avx2_panel<4>,
                                            f32_avx2_panel<5>, f32_avx2_panel<6>};
  return t[m];
}
PanelFn<uint32_t, uint16_t> bf16_avx2(int m) {
  static const PanelFn<uint32_t, uint16_t> t[] = {nullptr, bf16_avx2_panel<1>, bf16_avx2_panel<2>,
                                                   bf16_avx2_panel<3>, bf16_avx2_panel<4>,
                                                   bf16_avx2_panel<5>, bf16_avx2_panel<6>};
  return t[m];
}

enum Isa { NONE = 0, AVX2 = 1, AVX512 = 2, AVX512BF16 = 3 };

Isa detect() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) {
    return __builtin_cpu_supports("avx512bf16") ? AVX512BF16 : AVX512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return AVX2;
  return NONE;
}

const Isa g_detected = detect();
Isa g_isa = g_detected;  // may be lowered by force_isa() (tests)

// x: [M, Kw] in units of E (bf16 rows viewed as uint32 pairs), row stride ldx.
template <typename E, typename T>
void run(const E* x, int64_t ldx, int64_t M, const T* w, int64_t Kw, int64_t panel_elems,
         int64_t N, T* y, int64_t ldy, const T* bias, PanelFn<E, T> (*table)(int), int mmax) {
  // Transpose activations chunk-wise: chunk c (rows m0..m0+mc) -> xt[m0*Kw + k*mc + m].
  std::vector<E> xt(size_t(M * Kw));
  for (int64_t m0 = 0; m0 < M; m0 += mmax) {
    const int64_t mc = std::min<int64_t>(mmax, M - m0);
    E* dst = xt.data() + m0 * Kw;
    for (int64_t m = 0; m < mc; ++m)
      for (int64_t k = 0; k < Kw; ++k) dst[k * mc + m] = x[(m0 + m) * ldx + k];
  }
  const int64_t P = (N + PW - 1) / PW;
  // Small layers: don't wake the second thread for < ~64 KB of weights.
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / (panel_elems * int64_t(sizeof(T))));
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const T* wp = w + p * panel_elems;
      const int nn = int(std::min<int64_t>(PW, N - p * PW));
      for (int64_t m0 = 0; m0 < M; m0 += mmax) {
        const int mc = int(std::min<int64_t>(mmax, M - m0));
        const Out o{y + m0 * ldy + p * PW, ldy, bias ? bias + p * PW : nullptr, nn};
        table(mc)(xt.data() + m0 * Kw, wp, Kw, o);
      }
    }
  });
}

}  // namespace

// x: [M, K] (row stride ldx, unit column stride), packed: see header, N: out
// features. Returns y [M, N]. For bf16 K must be even (caller pads).
torch::Tensor skinny_linear(const torch::Tensor& x, const torch::Tensor& packed,
                            const c10::optional<torch::Tensor>& bias, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be 2-D with unit inner stride");
  TORCH_CHECK(packed.is_contiguous() && x.scalar_type() == packed.scalar_type(), "bad packed weight");
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t P = (N + PW - 1) / PW;
  TORCH_CHECK(packed.numel() == P * PW * K, "packed weight does not match x / N");
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) TORCH_CHECK(bias->is_contiguous() && bias->numel() == N && bias->scalar_type() == x.scalar_type());
  if (x.scalar_type() == torch::kFloat32) {
    const bool a512 = g_isa >= AVX512;
    run<float, float>(x.data_ptr<float>(), x.stride(0), M, packed.data_ptr<float>(), K, K * PW, N,
               y.data_ptr<float>(), N, has_bias ? bias->data_ptr<float>() : nullptr,
               a512 ? f32_avx512 : f32_avx2, a512 ? 16 : 6);
  } else if (x.scalar_type() == torch::kBFloat16) {
    TORCH_CHECK(K % 2 == 0, "bf16 path needs even K");
    const bool bf = g_isa == AVX512BF16;
    TORCH_CHECK(x.stride(0) % 2 == 0, "bf16 path needs even row stride");
    auto cast = [](const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); };
    run<uint32_t, uint16_t>(reinterpret_cast<const uint32_t*>(x.data_ptr()), x.stride(0) / 2, M,
                  cast(packed), K / 2, K * PW, N,
                  reinterpret_cast<uint16_t*>(y.data_ptr()), N, has_bias ? cast(*bias) : nullptr,
                  bf ? bf16_avx512bf16 : bf16_avx2, bf ? 16 : 6);
  } else {
    TORCH_CHECK(false, "unsupported dtype");
  }
  return y;
}

// One row of rms_norm below, in place: row = row * rsqrt(mean(row^2) + eps) * (w + off) (w null: * 1);
// the sum of squares in double (8 partial sums), so the mean is correctly rounded to fp32.
static void norm_row_inplace(float* row, const float* w, float off, float e, int64_t H) {
  double part[8] = {0};
  int64_t k = 0;
  for (; k + 8 <= H; k += 8)
    for (int j = 0; j < 8; ++j) part[j] += double(row[k + j] * row[k + j]);
  double ss = 0;
  for (int j = 0; j < 8; ++j) ss += part[j];
  for (; k < H; ++k) ss += double(row[k] * row[k]);
  const float inv = 1.0f / std::sqrt(float(ss / double(H)) + e);
  for (int64_t k2 = 0; k2 < H; ++k2) row[k2] = row[k2] * inv * (w ? w[k2] + off : 1.0f);
}

// RMS norm of the rows of x [*, H] (fp32 or bf16, contiguous), computed in fp32:
// y = x * rsqrt(mean(x^2) + eps) * (w + offset)  (no weight: * 1). One pass per row, no
// temporaries: torch's CPU rms_norm costs ~10 us per decode-step row (fp32) and ~25 us for bf16
// with its conversions; this is ~1 us.
torch::Tensor rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& weight, double eps, double offset) {
  TORCH_CHECK(x.is_contiguous() && x.dim() >= 1, "rms_norm: x must be contiguous");
  const bool bf = x.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(bf || x.scalar_type() == torch::kFloat32, "rms_norm: fp32 or bf16 only");
  const int64_t H = x.size(-1), R = H ? x.numel() / H : 0;
  const bool has_w = weight.has_value() && weight->defined();
  if (has_w) TORCH_CHECK(weight->is_contiguous() && weight->scalar_type() == torch::kFloat32 && weight->numel() == H,
                         "rms_norm: weight must be fp32 [H]");
  auto y = torch::empty_like(x);
  const float* w = has_w ? weight->data_ptr<float>() : nullptr;
  const float off = float(offset), e = float(eps);
  std::vector<float> row(H);
  for (int64_t r = 0; r < R; ++r) {
    if (bf) {
      const uint16_t* xr = reinterpret_cast<const uint16_t*>(x.data_ptr()) + r * H;
      for (int64_t k = 0; k < H; ++k) row[k] = bf16_to_f32(xr[k]);
    } else {
      std::memcpy(row.data(), x.data_ptr<float>() + r * H, H * sizeof(float));
    }
    norm_row_inplace(row.data(), w, off, e, H);
    if (bf) {
      uint16_t* yr = reinterpret_cast<uint16_t*>(y.data_ptr()) + r * H;
      for (int64_t k2 = 0; k2 < H; ++k2) yr[k2] = f32_to_bf16(row[k2]);
    } else {
      std::memcpy(y.data_ptr<float>() + r * H, row.data(), H * sizeof(float));
    }
  }
  return y;
}

// Clustered LM head of an MTP drafter: out[b, j*P + p] = <w[top[b, j], p, :], s[b, :]>, the
// logits of the P tokens of each chosen cluster. w is the cluster-major LM weight [C, P, H] (fp32
// or bf16), s [B, H] the drafter states (same dtype), top [B, k] the chosen clusters. One call
// instead of B*k matrix-vector products from Python (~20 us each with dispatch); the clusters are
// split over the threads. fp32 accumulation, AVX2+FMA (AVX-512 machines have it too).
namespace {
__attribute__((target("avx2,fma")))
inline float hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

template <typename T>
__attribute__((target("avx2,fma")))
inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else {  // bf16: the top 16 bits of an fp32
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

// P dot products of rows w[p*H ..] with s (fp32, H values); 4 rows at a time share the s loads.
template <typename T>
__attribute__((target("avx2,fma")))
void cluster_dots(const T* w, const float* s, int64_t P, int64_t H, float* out) {
  const int64_t H8 = H / 8 * 8;
  int64_t p = 0;
  for (; p + 4 <= P; p += 4) {
    const T* r0 = w + p * H;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < H8; k += 8) {
      const __m256 sv = _mm256_loadu_ps(s + k);
      a0 = _mm256_fmadd_ps(load8(r0 + k), sv, a0);
      a1 = _mm256_fmadd_ps(load8(r0 + H + k), sv, a1);
      a2 = _mm256_fmadd_ps(load8(r0 + 2 * H + k), sv, a2);
      a3 = _mm256_fmadd_ps(load8(r0 + 3 * H + k), sv, a3);
    }
    float v[4] = {hsum256(a0), hsum256(a1), hsum256(a2), hsum256(a3)};
    for (int i = 0; i < 4; ++i) {
      for (int64_t k = H8; k < H; ++k) {
        const T x = r0[i * H + k];
        float f;
        if constexpr (std::is_same_v<T, float>) f = x; else f = bf16_to_f32(x);
        v[i] += f * s[k];
      }
      out[p + i] = v[i];
    }
  }
  for (; p < P; ++p) {
    float acc = 0;
    for (int64_t k = 0; k < H; ++k) {
      const T x = w[p * H + k];
      float f;
      if constexpr (std::is_same_v<T, float>) f = x; else f = bf16_to_f32(x);
      acc += f * s[k];
    }
    out[p] = acc;
  }
}
}  // namespace

torch::Tensor cluster_scores(const torch::Tensor& w, const torch::Tensor& s, const torch::Tensor& top) {
  TORCH_CHECK(g_isa >= AVX2, "cluster_scores needs AVX2+FMA");
  TORCH_CHECK(w.dim() == 3 && w.is_contiguous(), "cluster_scores: w must be contiguous [C, P, H]");
  TORCH_CHECK(s.dim() == 2 && s.size(1) == w.size(2) && s.scalar_type() == w.scalar_type(),
              "cluster_scores: s must be [B, H] in w's dtype");
  TORCH_CHECK(top.dim() == 2 && top.size(0) == s.size(0) && top.scalar_type() == torch::kLong,
              "cluster_scores: top must be int64 [B, k]");
  const bool bf = w.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(bf || w.scalar_type() == torch::kFloat32, "cluster_scores: fp32 or bf16 only");
  const int64_t C = w.size(0), P = w.size(1), H = w.size(2), B = s.size(0), K = top.size(1);
  auto sf = s.to(torch::kFloat32).contiguous();
  auto topc = top.contiguous();
  const int64_t* tp = topc.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * K; ++i) TORCH_CHECK(tp[i] >= 0 && tp[i] < C, "cluster_scores: cluster id out of range");
  auto out = torch::empty({B, K * P}, s.options().dtype(torch::kFloat32));
  float* op = out.data_ptr<float>();
  const float* spt = sf.data_ptr<float>();
  // work items (row, chosen cluster) in cluster order: the rows that chose a cluster read its
  // block one after the other while it is in cache (many rows share clusters in a large batch;
  // in row order every item streamed its block from memory)
  std::vector<int64_t> items(B * K);
  for (int64_t i = 0; i < B * K; ++i) items[i] = i;
  if (B > 1) std::stable_sort(items.begin(), items.end(), [&](int64_t x, int64_t y) { return tp[x] < tp[y]; });
  at::parallel_for(0, B * K, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t i = items[j], b = i / K, c = tp[i];
      if (bf) {
        cluster_dots(reinterpret_cast<const uint16_t*>(w.data_ptr()) + c * P * H, spt + b * H, P, H, op + i * P);
      } else {
        cluster_dots(w.data_ptr<float>() + c * P * H, spt + b * H, P, H, op + i * P);
      }
    }
  });
  return bf ? out.to(torch::kBFloat16) : out;
}

// Rows ids[i] of a packed weight (see the header's layouts), unpacked: out [n, K_padded] in the
// weight's dtype (the caller drops bf16's padding column). For tied embeddings read at decode and
// drafting steps: one strided copy per row instead of ~6 torch ops.
torch::Tensor panel_rows(const torch::Tensor& packed, const torch::Tensor& ids, int64_t rows) {
  TORCH_CHECK(packed.is_contiguous() && (packed.dim() == 3 || packed.dim() == 4), "panel_rows: bad packed weight");
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == torch::kLong, "panel_rows: ids must be int64 [n]");
  const bool bf = packed.dim() == 4;
  const int64_t P = packed.size(0), n = ids.size(0);
  const int64_t K = bf ? packed.size(1) * 2 : packed.size(1);
  auto out = torch::empty({n, K}, packed.options());
  auto idc = ids.contiguous();
  const int64_t* id = idc.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = id[i], p = r / PW, j = r % PW;
    TORCH_CHECK(r >= 0 && r < rows && p < P, "panel_rows: row id ", r, " out of range [0, ", rows, ")");
    if (bf) {  // P[p][q][j][i]
      const uint32_t* src = reinterpret_cast<const uint32_t*>(packed.data_ptr()) + p * (K / 2) * PW + j;
      uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr()) + i * (K / 2);
      for (int64_t q = 0; q < K / 2; ++q) dst[q] = src[q * PW];
    } else {  // P[p][k][j]
      const float* src = packed.data_ptr<float>() + p * K * PW + j;
      float* dst = out.data_ptr<float>() + i * K;
      for (int64_t k = 0; k < K; ++k) dst[k] = src[k * PW];
    }
  }
  return out;
}

// ------------------------------------------------------------------ MTP drafter layer
// One layer of an MTP drafter (models/drafter.py, DrafterLayer) in one call, for N query rows that
// each see ALL keys of their row's K/V slice (no mask: batch 1, or rows of equal length):
//
//   a  = attention(rope(q_norm(q_proj(norm_in(h)))), K, V)     (scale 1, GQA; K/V fp32)
//   h1 = h + norm_post_attn(o_proj(a))
//   h2 = (h1 + norm_post_ff(down(act(gate(x)) * up(x)))) * layer_scalar,  x = norm_pre_ff(h1)
//
// Arithmetic is fp32 (norm sums in double, like rms_norm above); values are rounded to the
// drafter's dtype where the torch path rounds them (after each norm, projection, activation,
// product and residual add), so the two paths agree to the dtype's rounding. The point is not
// the maths but the ~60 torch calls per layer it replaces (~0.2 ms per drafting step, as much as
// the weights' streaming). Row r of the K/V (k: [R, KVH, L, HD], last dim contiguous) serves
// query rows r*W .. r*W+W-1 (W = N / R drafts per row).
void quant_gemm_f32(const float* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t N, int64_t K, int fmt, int B,
                    int sm, float* y, const float* bias);  // quant_gemm.cpp
void quant_gemm_bf16(const uint16_t* x, int64_t ldx, int64_t M, const uint8_t* w, int64_t N, int64_t K, int fmt, int B,
                     int sm, uint16_t* y, const float* bias);
int64_t quant_packed_bytes(int64_t N, int64_t K, int fmt, int B, int sm);
bool quant_weight_ok(const torch::Tensor& packed, const std::vector<int64_t>& meta, int64_t want_n, int64_t want_k);

namespace {
template <typename T> inline float ldf(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, float>) return p[i]; else return bf16_to_f32(p[i]);
}
template <typename T> inline void stf(T* p, int64_t i, float v) {
  if constexpr (std::is_same_v<T, float>) p[i] = v; else p[i] = f32_to_bf16(v);
}
template <typename T> inline float rnd(float v) {  // round to T's precision
  if constexpr (std::is_same_v<T, float>) return v; else return bf16_to_f32(f32_to_bf16(v));
}

// y[n, :] = x[n, :] * rsqrt(mean(x^2) + eps) * w, n < rows (fp32 maths, result rounded to T)
template <typename T>
void norm_rows(const T* x, const float* w, float eps, int64_t rows, int64_t H, T* y) {
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t k = 0; k < H; ++k) { const float v = ldf(x, r * H + k); ss += double(v * v); }
    const float inv = 1.0f / std::sqrt(float(ss / double(H)) + eps);
    for (int64_t k = 0; k < H; ++k) stf(y, r * H + k, ldf(x, r * H + k) * inv * w[k]);
  }
}

// A drafter layer's weight: packed for the skinny GEMM above (in the activations' dtype), or
// quantized (uint8, kernels/quant.py's layout: `fmt` bits, blocks of B inputs, scale mode sm).
struct LayerWeight {
  const torch::Tensor* packed;
  bool quant;
  int fmt, B, sm;
};

// y [M, N] = x [M, K] @ W^T, through the skinny GEMM above or the quantized one (quant_gemm.cpp)
template <typename T>
void gemm(const T* x, int64_t M, int64_t K, const LayerWeight& lw, int64_t N, T* y) {
  const torch::Tensor& packed = *lw.packed;
  if (lw.quant) {
    const uint8_t* w = packed.data_ptr<uint8_t>();
    if constexpr (std::is_same_v<T, float>)
      quant_gemm_f32(x, K, M, w, N, K, lw.fmt, lw.B, lw.sm, y, nullptr);
    else
      quant_gemm_bf16(x, K, M, w, N, K, lw.fmt, lw.B, lw.sm, y, nullptr);
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    const bool a512 = g_isa >= AVX512;
    run<float, float>(x, K, M, packed.data_ptr<float>(), K, K * PW, N, y, N, nullptr,
                      a512 ? f32_avx512 : f32_avx2, a512 ? 16 : 6);
  } else {
    const bool bf = g_isa == AVX512BF16;
    run<uint32_t, uint16_t>(reinterpret_cast<const uint32_t*>(x), K / 2, M,
                            reinterpret_cast<const uint16_t*>(packed.data_ptr()), K / 2, K * PW, N, y, N, nullptr,
                            bf ? bf16_avx512bf16 : bf16_avx2, bf ? 16 : 6);
  }
}

// Attention of the G = heads-per-kv-head query vectors q[G][HD] (fp32) over L keys/values
// (row stride ks / vs floats, HD % 8 == 0): out[G][HD] (fp32).
__attribute__((target("avx2,fma")))
void attend_group(const float* q, int G, const float* k, int64_t ks, const float* v, int64_t vs, int64_t L,
                  int64_t HD, float* scores, float* out) {
  for (int64_t j = 0; j < L; ++j) {
    const float* kj = k + j * ks;
    for (int g = 0; g < G; ++g) {
      const float* qg = q + g * HD;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t d = 0; d < HD; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d), _mm256_loadu_ps(kj + d), acc);
      scores[g * L + j] = hsum256(acc);
    }
  }
  for (int g = 0; g < G; ++g) {
    float* sg = scores + g * L;
    float mx = -INFINITY;
    for (int64_t j = 0; j < L; ++j) mx = std::max(mx, sg[j]);
    float sum = 0;
    for (int64_t j = 0; j < L; ++j) { sg[j] = std::exp(sg[j] - mx); sum += sg[j]; }
    const float inv = 1.0f / sum;
    float* og = out + g * HD;
    for (int64_t d = 0; d < HD; ++d) og[d] = 0;
    for (int64_t d0 = 0; d0 < HD; d0 += 32) {  // 4 accumulators of 8 dims at a time
      const int64_t n8 = std::min<int64_t>(4, (HD - d0) / 8);
      __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t j = 0; j < L; ++j) {
        const __m256 p = _mm256_set1_ps(sg[j]);
        const float* vj = v + j * vs + d0;
        for (int64_t i = 0; i < n8; ++i) a[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 8 * i), a[i]);
      }
      for (int64_t i = 0; i < n8; ++i) _mm256_storeu_ps(og + d0 + 8 * i, _mm256_mul_ps(a[i], _mm256_set1_ps(inv)));
    }
  }
}

inline float gelu_tanh(float x) {
  const float c = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * x * (1.0f + std::tanh(c * (x + 0.044715f * x * x * x)));
}
inline float silu(float x) { return x / (1.0f + std::exp(-x)); }

// spans: nullptr (every K/V row reads all L keys) or [R][2] (start, end): K/V row r reads keys
// start .. end-1 only (rows of a ragged batch: shorter rows hold other data past their length, and
// a sliding window starts later for longer rows); 0 <= start < end <= L (checked by the callers).
template <typename T>
torch::Tensor drafter_layer_impl(const torch::Tensor& h, const std::vector<LayerWeight>& w, int64_t INTER,
                                 const std::vector<torch::Tensor>& nw, double eps_d, const torch::Tensor& k,
                                 const torch::Tensor& v, const torch::Tensor& cos, const torch::Tensor& sin,
                                 int64_t NH, double layer_scalar, bool gelu, const int64_t* spans = nullptr) {
  const int64_t N = h.size(0), H = h.size(1), R = k.size(0), KVH = k.size(1), L = k.size(2), HD = k.size(3);
  const int64_t QS = NH * HD;
  const int64_t W = N / R, G = NH / KVH, ROT = cos.size(1);
  const float eps = float(eps_d);
  const T* hp = reinterpret_cast<const T*>(h.data_ptr());
  std::vector<T> xn(N * H), q(N * QS), att(N * QS), o(N * H), gt(N * INTER), up(N * INTER);
  // attention block
  norm_rows(hp, nw[0].data_ptr<float>(), eps, N, H, xn.data());
  gemm(xn.data(), N, H, w[0], QS, q.data());
  std::vector<float> qf(N * QS);
  const float* qn = nw[1].data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    const float* c = cos.data_ptr<float>() + (n / W) * ROT;
    const float* s = sin.data_ptr<float>() + (n / W) * ROT;
    for (int64_t hh = 0; hh < NH; ++hh) {
      const int64_t base = n * QS + hh * HD;
      double ss = 0;
      for (int64_t d = 0; d < HD; ++d) { const float x = ldf(q.data(), base + d); ss += double(x * x); }
      const float inv = 1.0f / std::sqrt(float(ss / double(HD)) + eps);
      float x[512];
      for (int64_t d = 0; d < HD; ++d) x[d] = rnd<T>(ldf(q.data(), base + d) * inv * qn[d]);
      const int64_t half = ROT / 2;
      for (int64_t d = 0; d < HD; ++d) {
        float y = x[d];
        if (d < ROT) y = x[d] * c[d] + (d < half ? -x[d + half] : x[d - half]) * s[d];
        qf[base + d] = rnd<T>(y);
      }
    }
  }
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  // one task per (kv row, kv head, draft): its G query heads share the keys
  at::parallel_for(0, R * KVH * W, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(G * L), out(G * HD), qg(G * HD);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = t / (KVH * W), kh = (t / W) % KVH, wi = t % W, n = r * W + wi;
      const int64_t s0 = spans ? spans[2 * r] : 0, Lr = spans ? spans[2 * r + 1] - s0 : L;
      for (int64_t g = 0; g < G; ++g)
        std::memcpy(qg.data() + g * HD, qf.data() + n * QS + (kh * G + g) * HD, HD * sizeof(float));
      attend_group(qg.data(), int(G), kp + r * ks0 + kh * ks1 + s0 * ks2, ks2, vp + r * vs0 + kh * vs1 + s0 * vs2,
                   vs2, Lr, HD, scores.data(), out.data());
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < HD; ++d) stf(att.data(), n * QS + (kh * G + g) * HD + d, out[g * HD + d]);
    }
  });
  gemm(att.data(), N, QS, w[1], H, o.data());
  std::vector<T> tmp(N * H), h1(N * H);
  norm_rows(o.data(), nw[2].data_ptr<float>(), eps, N, H, tmp.data());
  for (int64_t i = 0; i < N * H; ++i) stf(h1.data(), i, ldf(hp, i) + ldf(tmp.data(), i));
  // MLP block
  norm_rows(h1.data(), nw[3].data_ptr<float>(), eps, N, H, xn.data());
  gemm(xn.data(), N, H, w[2], INTER, gt.data());
  gemm(xn.data(), N, H, w[3], INTER, up.data());
  for (int64_t i = 0; i < N * INTER; ++i) {
    const float a = rnd<T>(gelu ? gelu_tanh(ldf(gt.data(), i)) : silu(ldf(gt.data(), i)));
    stf(gt.data(), i, a * ldf(up.data(), i));
  }
  gemm(gt.data(), N, INTER, w[4], H, o.data());
  norm_rows(o.data(), nw[4].data_ptr<float>(), eps, N, H, tmp.data());
  auto y = torch::empty_like(h);
  T* yp = reinterpret_cast<T*>(y.data_ptr());
  const float ls = float(layer_scalar);
  for (int64_t i = 0; i < N * H; ++i) stf(yp, i, rnd<T>(ldf(h1.data(), i) + ldf(tmp.data(), i)) * ls);
  return y;
}
// The five weights of a drafter layer (q, o, gate, up, down) checked against its widths: quantized
// (qmeta: [out, in, bits, block, scale mode] each) or packed for the skinny GEMM. Sets INTER.
std::vector<LayerWeight> layer_weights(const std::vector<torch::Tensor>& packed,
                                       const std::vector<std::vector<int64_t>>& qmeta, int64_t H, int64_t QS,
                                       int64_t& INTER) {
  std::vector<LayerWeight> w(5);
  if (!qmeta.empty()) {
    INTER = qmeta[2][0];
    const int64_t want[5][2] = {{QS, H}, {H, QS}, {INTER, H}, {INTER, H}, {H, INTER}};
    for (int i = 0; i < 5; ++i) {
      const auto& q = qmeta[i];
      TORCH_CHECK(q.size() == 5 && q[0] == want[i][0] && q[1] == want[i][1],
                  "drafter_layer: quantized weight ", i, " must be [", want[i][0], ", ", want[i][1], "]");
      const int fmt = int(q[2]), B = int(q[3]), sm = int(q[4]);
      TORCH_CHECK(((fmt == 4 && B == 32) || (fmt == 8 && (B == 16 || B == 32))) && sm >= 0 && sm <= 2 && q[1] % B == 0,
                  "drafter_layer: unsupported quantized format of weight ", i);
      TORCH_CHECK(packed[i].numel() == quant_packed_bytes(q[0], q[1], fmt, B, sm),
                  "drafter_layer: packed size of quantized weight ", i, " does not match its shape");
      w[i] = {&packed[i], true, fmt, B, sm};
    }
  } else {
    // packed numel = out features padded to 16 * in features (even here)
    TORCH_CHECK(packed[0].numel() == (QS + PW - 1) / PW * PW * H && packed[1].numel() == (H + PW - 1) / PW * PW * QS,
                "drafter_layer: q/o weight shapes");
    TORCH_CHECK(packed[2].numel() == packed[3].numel() && packed[2].numel() % (PW * H) == 0 &&
                packed[4].numel() == (H + PW - 1) / PW * PW * (packed[2].numel() / H),
                "drafter_layer: MLP weight shapes (intermediate size must be a multiple of 16)");
    INTER = packed[2].numel() / H;
    for (int i = 0; i < 5; ++i) w[i] = {&packed[i], false, 0, 0, 0};
  }
  return w;
}
}  // namespace

torch::Tensor drafter_layer(const torch::Tensor& h, const std::vector<torch::Tensor>& packed,
                            const std::vector<torch::Tensor>& norm_weights, double eps, const torch::Tensor& k,
                            const torch::Tensor& v, const torch::Tensor& cos, const torch::Tensor& sin,
                            int64_t n_heads, double layer_scalar, bool gelu,
                            const std::vector<std::vector<int64_t>>& qmeta) {
  TORCH_CHECK(g_isa >= AVX2, "drafter_layer needs AVX2+FMA");
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous(), "drafter_layer: h must be contiguous [N, H]");
  const bool bf = h.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(bf || h.scalar_type() == torch::kFloat32, "drafter_layer: h must be fp32 or bf16");
  TORCH_CHECK(packed.size() == 5 && norm_weights.size() == 5, "drafter_layer: 5 packed weights (q, o, gate, up, "
              "down) and 5 norm weights (input, q, post-attention, pre-feedforward, post-feedforward)");
  const bool quant = !qmeta.empty();
  TORCH_CHECK(!quant || qmeta.size() == 5, "drafter_layer: qmeta must be empty or 5 [out, in, bits, block, scale mode]");
  for (const auto& p : packed)
    TORCH_CHECK(p.is_contiguous() && p.scalar_type() == (quant ? torch::kUInt8 : h.scalar_type()),
                quant ? "drafter_layer: quantized weights must be contiguous uint8"
                      : "drafter_layer: weights must be packed in h's dtype");
  for (const auto& n : norm_weights)
    TORCH_CHECK(n.is_contiguous() && n.scalar_type() == torch::kFloat32, "drafter_layer: norm weights must be fp32");
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes() && k.scalar_type() == torch::kFloat32 &&
              v.scalar_type() == torch::kFloat32 && k.stride(3) == 1 && v.stride(3) == 1,
              "drafter_layer: k, v must be fp32 [R, KVH, L, HD] with a contiguous last dim");
  const int64_t N = h.size(0), H = h.size(1), R = k.size(0), KVH = k.size(1), L = k.size(2), HD = k.size(3);
  TORCH_CHECK(R > 0 && N % R == 0 && L > 0, "drafter_layer: N must be a multiple of the K/V rows, L > 0");
  TORCH_CHECK(n_heads % KVH == 0 && HD % 8 == 0 && HD <= 512, "drafter_layer: heads / head_dim not supported");
  TORCH_CHECK(norm_weights[0].numel() == H && norm_weights[1].numel() == HD && norm_weights[2].numel() == H &&
              norm_weights[3].numel() == H && norm_weights[4].numel() == H, "drafter_layer: norm weight sizes");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == R && sin.sizes() == cos.sizes() && cos.size(1) <= HD &&
              cos.size(1) % 2 == 0 && cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 &&
              cos.is_contiguous() && sin.is_contiguous(), "drafter_layer: cos/sin must be fp32 [R, rotary_dim]");
  const int64_t QS = n_heads * HD;
  TORCH_CHECK(H % 2 == 0 && QS % 2 == 0, "drafter_layer: even widths only");
  int64_t INTER;
  const std::vector<LayerWeight> w = layer_weights(packed, qmeta, H, QS, INTER);
  if (bf) return drafter_layer_impl<uint16_t>(h, w, INTER, norm_weights, eps, k, v, cos, sin, n_heads, layer_scalar, gelu);
  return drafter_layer_impl<float>(h, w, INTER, norm_weights, eps, k, v, cos, sin, n_heads, layer_scalar, gelu);
}

// ------------------------------------------------------------------ MTP drafting chain
// `steps` greedy drafts per row in one call (MtpProposer): per step
//   x = [embed(tok) * embed_scale, hidden] (rounded to T);  h = pre_projection(x)
//   h = layer_i(h) for every layer (drafter_layer_impl);  s = norm(h)  (rms_norm's row maths)
//   hidden = post_projection(s);  top_k clusters by centroid score (ties: lower cluster first)
//   tok = argmax over the chosen clusters' tokens of <lm row, s> (rounded to T; first maximum)
// exactly the operations and roundings of the torch path (models/drafter.py), ~50 torch calls per
// step that each run cold right after a target step. embed: the target's embedding rows, a packed
// quantized table (embed_meta = N, K, bits, block, scale mode) or dense fp32 [V, Ht]; proj: pre,
// post, centroids, each packed in T (meta empty) or quantized; per layer: the drafter_layer
// arguments, with its K/V slice, fp32 RoPE rows [B, rot] and the rows' key spans (empty: every row
// reads all of the slice; else [B, 2] start, end: a ragged batch); lm: the cluster-major LM weight [V, H]
// in T; ordering [V]: the token of each of its rows. Returns the drafts [B, steps] (int64).
void quant_row_f32(const uint8_t* wp, int64_t K, int fmt, int B, int sm, int64_t n, float* out);  // quant_gemm.cpp

namespace {
template <typename T>
torch::Tensor drafter_chain_impl(const torch::Tensor& tok, const torch::Tensor& hidden, const torch::Tensor& embed,
                                 const std::vector<int64_t>& embed_meta, float embed_scale,
                                 const std::vector<LayerWeight>& proj, const std::vector<int64_t>& proj_n,
                                 const std::vector<std::vector<LayerWeight>>& lw, const std::vector<int64_t>& inter,
                                 const std::vector<std::vector<torch::Tensor>>& norms, const std::vector<double>& scalars,
                                 const std::vector<torch::Tensor>& k, const std::vector<torch::Tensor>& v,
                                 const std::vector<torch::Tensor>& cos, const std::vector<torch::Tensor>& sin,
                                 const std::vector<const int64_t*>& spans,
                                 const float* final_norm, float eps, int64_t NH, bool gelu, const T* lm,
                                 const int64_t* ordering, int64_t C, int64_t P, int64_t top_k, int64_t steps) {
  const int64_t B = tok.size(0), Ht = hidden.size(1), H = proj_n[0], V = C * P;
  const auto dt = std::is_same_v<T, float> ? torch::kFloat32 : torch::kBFloat16;
  auto out = torch::empty({B, steps}, torch::kLong);
  int64_t* op = out.data_ptr<int64_t>();
  std::vector<float> emb(Ht), hid(B * Ht), row(H), sf(B * H), dots(B * top_k * P);
  std::vector<int64_t> order(B * C);
  const float* h0 = hidden.data_ptr<float>();
  std::copy(h0, h0 + B * Ht, hid.begin());
  std::vector<int64_t> cur(tok.data_ptr<int64_t>(), tok.data_ptr<int64_t>() + B);
  const int64_t EV = embed_meta.empty() ? embed.size(0) : embed_meta[0];
  std::vector<T> x(B * 2 * Ht), s(B * H), post(B * Ht), cs(B * C);
  for (int64_t step = 0; step < steps; ++step) {
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(cur[b] >= 0 && cur[b] < EV, "drafter_chain: token id ", cur[b], " outside the vocabulary");
      if (embed_meta.empty())
        std::copy(embed.data_ptr<float>() + cur[b] * Ht, embed.data_ptr<float>() + (cur[b] + 1) * Ht, emb.begin());
      else
        quant_row_f32(embed.data_ptr<uint8_t>(), Ht, int(embed_meta[2]), int(embed_meta[3]), int(embed_meta[4]),
                      cur[b], emb.data());
      for (int64_t i = 0; i < Ht; ++i) {
        stf(x.data(), b * 2 * Ht + i, emb[i] * embed_scale);
        stf(x.data(), b * 2 * Ht + Ht + i, hid[b * Ht + i]);
      }
    }
    auto h = torch::empty({B, H}, torch::TensorOptions().dtype(dt));
    gemm(x.data(), B, 2 * Ht, proj[0], H, reinterpret_cast<T*>(h.data_ptr()));
    for (size_t l = 0; l < lw.size(); ++l)
      h = drafter_layer_impl<T>(h, lw[l], inter[l], norms[l], eps, k[l], v[l], cos[l], sin[l], NH, scalars[l], gelu,
                                spans[l]);
    const T* hp = reinterpret_cast<const T*>(h.data_ptr());
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < H; ++i) row[i] = ldf(hp, b * H + i);
      norm_row_inplace(row.data(), final_norm, 0.f, eps, H);
      for (int64_t i = 0; i < H; ++i) stf(s.data(), b * H + i, row[i]);
      for (int64_t i = 0; i < H; ++i) sf[b * H + i] = ldf(s.data(), b * H + i);
    }
    gemm(s.data(), B, H, proj[1], Ht, post.data());
    gemm(s.data(), B, H, proj[2], C, cs.data());
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < Ht; ++i) hid[b * Ht + i] = ldf(post.data(), b * Ht + i);
      int64_t* ob = order.data() + b * C;
      for (int64_t c = 0; c < C; ++c) ob[c] = c;
      const T* sc = cs.data() + b * C;
      std::partial_sort(ob, ob + top_k, ob + C, [&](int64_t a, int64_t c) {
        const float fa = ldf(sc, a), fc = ldf(sc, c);
        return fa > fc || (fa == fc && a < c);
      });
    }
    // every row's chosen clusters' token scores in one parallel region (as cluster_scores: each
    // cluster's rows are one contiguous block read from memory), then each row's argmax in
    // cluster order
    at::parallel_for(0, B * top_k, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / top_k, j = i % top_k;
        cluster_dots(lm + order[b * C + j] * P * H, sf.data() + b * H, P, H, dots.data() + i * P);
      }
    });
    for (int64_t b = 0; b < B; ++b) {
      float best = -INFINITY;
      int64_t arg = -1;
      for (int64_t j = 0; j < top_k; ++j) {
        const int64_t c = order[b * C + j];
        const float* d = dots.data() + (b * top_k + j) * P;
        for (int64_t p = 0; p < P; ++p) {
          const float val = rnd<T>(d[p]);
          if (arg < 0 || val > best) best = val, arg = c * P + p;
        }
      }
      TORCH_CHECK(arg >= 0 && arg < V, "drafter_chain: no candidate token");
      cur[b] = ordering[arg];
      op[b * steps + step] = cur[b];
    }
  }
  return out;
}
}  // namespace

torch::Tensor drafter_chain(const torch::Tensor& tok, const torch::Tensor& hidden, const torch::Tensor& embed,
                            const std::vector<int64_t>& embed_meta, double embed_scale,
                            const std::vector<torch::Tensor>& proj, const std::vector<std::vector<int64_t>>& proj_meta,
                            const std::vector<std::vector<torch::Tensor>>& layer_packed,
                            const std::vector<std::vector<torch::Tensor>>& layer_norms,
                            const std::vector<std::vector<std::vector<int64_t>>>& layer_qmeta,
                            const std::vector<double>& layer_scalars, const std::vector<torch::Tensor>& k,
                            const std::vector<torch::Tensor>& v, const std::vector<torch::Tensor>& cos,
                            const std::vector<torch::Tensor>& sin, const std::vector<torch::Tensor>& spans,
                            const torch::Tensor& final_norm, double eps,
                            int64_t n_heads, bool gelu, const torch::Tensor& lm, const torch::Tensor& ordering,
                            int64_t num_clusters, int64_t top_k, int64_t steps) {
  TORCH_CHECK(g_isa >= AVX2, "drafter_chain needs AVX2+FMA");
  TORCH_CHECK(tok.dim() == 1 && tok.scalar_type() == torch::kLong && tok.is_contiguous(), "drafter_chain: tok [B] int64");
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == tok.size(0) && hidden.scalar_type() == torch::kFloat32 &&
              hidden.is_contiguous(), "drafter_chain: hidden [B, target hidden] fp32");
  const int64_t Ht = hidden.size(1);
  if (embed_meta.empty()) {
    TORCH_CHECK(embed.dim() == 2 && embed.size(1) == Ht && embed.scalar_type() == torch::kFloat32 &&
                embed.is_contiguous(), "drafter_chain: dense embedding fp32 [V, target hidden]");
  } else {
    TORCH_CHECK(quant_weight_ok(embed, embed_meta, -1, Ht), "drafter_chain: packed embedding");
  }
  TORCH_CHECK(lm.dim() == 2 && lm.is_contiguous() && num_clusters > 0 && lm.size(0) % num_clusters == 0,
              "drafter_chain: cluster-major LM weight [V, H]");
  const bool bf = lm.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(bf || lm.scalar_type() == torch::kFloat32, "drafter_chain: fp32 or bf16 drafter");
  const int64_t H = lm.size(1), C = num_clusters, P = lm.size(0) / C;
  TORCH_CHECK(ordering.dim() == 1 && ordering.numel() == lm.size(0) && ordering.scalar_type() == torch::kLong &&
              ordering.is_contiguous(), "drafter_chain: token ordering [V] int64");
  TORCH_CHECK(top_k > 0 && top_k <= C && steps > 0, "drafter_chain: top_k in 1..clusters, steps > 0");
  TORCH_CHECK(final_norm.numel() == H && final_norm.scalar_type() == torch::kFloat32 && final_norm.is_contiguous(),
              "drafter_chain: final norm fp32 [H]");
  TORCH_CHECK(proj.size() == 3 && proj_meta.size() == 3, "drafter_chain: pre, post and centroid weights");
  const int64_t pn[3] = {H, Ht, C}, pk[3] = {2 * Ht, H, H};
  std::vector<LayerWeight> pw(3);
  for (int i = 0; i < 3; ++i) {
    const auto& m = proj_meta[i];
    if (m.empty()) {
      TORCH_CHECK(proj[i].is_contiguous() && proj[i].scalar_type() == lm.scalar_type() &&
                  proj[i].numel() == (pn[i] + PW - 1) / PW * PW * pk[i], "drafter_chain: packed projection ", i);
      pw[i] = {&proj[i], false, 0, 0, 0};
    } else {
      TORCH_CHECK(quant_weight_ok(proj[i], m, pn[i], pk[i]), "drafter_chain: quantized projection ", i);
      pw[i] = {&proj[i], true, int(m[2]), int(m[3]), int(m[4])};
    }
  }
  const size_t L = layer_packed.size();
  TORCH_CHECK(L > 0 && layer_norms.size() == L && layer_qmeta.size() == L && layer_scalars.size() == L &&
              k.size() == L && v.size() == L && cos.size() == L && sin.size() == L && spans.size() == L,
              "drafter_chain: per-layer lists");
  std::vector<const int64_t*> span_ptr(L, nullptr);
  std::vector<std::vector<LayerWeight>> lw(L);
  std::vector<int64_t> inter(L);
  for (size_t l = 0; l < L; ++l) {
    TORCH_CHECK(layer_packed[l].size() == 5 && layer_norms[l].size() == 5, "drafter_chain: 5 weights, 5 norms per layer");
    const auto& kc = k[l];
    TORCH_CHECK(kc.dim() == 4 && v[l].sizes() == kc.sizes() && kc.size(0) == tok.size(0) && kc.size(2) > 0 &&
                kc.scalar_type() == torch::kFloat32 && v[l].scalar_type() == torch::kFloat32 && kc.stride(3) == 1 &&
                v[l].stride(3) == 1, "drafter_chain: k, v fp32 [B, KVH, L, HD]");
    const int64_t HD = kc.size(3);
    TORCH_CHECK(n_heads % kc.size(1) == 0 && HD % 8 == 0 && HD <= 512, "drafter_chain: heads / head_dim");
    TORCH_CHECK(cos[l].dim() == 2 && cos[l].size(0) == tok.size(0) && sin[l].sizes() == cos[l].sizes() &&
                cos[l].size(1) <= HD && cos[l].size(1) % 2 == 0 && cos[l].scalar_type() == torch::kFloat32 &&
                sin[l].scalar_type() == torch::kFloat32 && cos[l].is_contiguous() && sin[l].is_contiguous(),
                "drafter_chain: cos/sin fp32 [B, rotary dims]");
    for (const auto& n : layer_norms[l])
      TORCH_CHECK(n.is_contiguous() && n.scalar_type() == torch::kFloat32, "drafter_chain: norm weights fp32");
    TORCH_CHECK(layer_norms[l][0].numel() == H && layer_norms[l][1].numel() == HD, "drafter_chain: norm sizes");
    if (layer_qmeta[l].empty())
      for (const auto& p : layer_packed[l])
        TORCH_CHECK(p.is_contiguous() && p.scalar_type() == lm.scalar_type(), "drafter_chain: packed layer weights");
    lw[l] = layer_weights(layer_packed[l], layer_qmeta[l], H, n_heads * HD, inter[l]);
    const auto& sp = spans[l];  // empty: every row reads all its keys; else [B, 2] key ranges
    if (sp.numel() > 0) {
      TORCH_CHECK(sp.dim() == 2 && sp.size(0) == tok.size(0) && sp.size(1) == 2 && sp.scalar_type() == torch::kLong &&
                  sp.is_contiguous(), "drafter_chain: spans int64 [B, 2]");
      const int64_t* p = sp.data_ptr<int64_t>();
      for (int64_t b = 0; b < tok.size(0); ++b)
        TORCH_CHECK(0 <= p[2 * b] && p[2 * b] < p[2 * b + 1] && p[2 * b + 1] <= kc.size(2),
                    "drafter_chain: row ", b, " key span [", p[2 * b], ", ", p[2 * b + 1], ") outside 1..", kc.size(2));
      span_ptr[l] = p;
    }
  }
  const int64_t* ord = ordering.data_ptr<int64_t>();
  if (bf)
    return drafter_chain_impl<uint16_t>(tok, hidden, embed, embed_meta, float(embed_scale), pw,
                                        std::vector<int64_t>(pn, pn + 3), lw, inter, layer_norms, layer_scalars, k, v,
                                        cos, sin, span_ptr, final_norm.data_ptr<float>(), float(eps), n_heads, gelu,
                                        reinterpret_cast<const uint16_t*>(lm.data_ptr()), ord, C, P, top_k, steps);
  return drafter_chain_impl<float>(tok, hidden, embed, embed_meta, float(embed_scale), pw,
                                   std::vector<int64_t>(pn, pn + 3), lw, inter, layer_norms, layer_scalars, k, v, cos,
                                   sin, span_ptr, final_norm.data_ptr<float>(), float(eps), n_heads, gelu,
                                   lm.data_ptr<float>(),
                                   ord, C, P, top_k, steps);
}

std::string isa_name() {
  switch (g_isa) {
    case AVX512BF16: return "avx512+bf16";
    case AVX512: return "avx512 (bf16 via avx2 kernel)";
    case AVX2: return "avx2";
    default: return "none";
  }
}

void register_quant(pybind11::module& m);      // quant_gemm.cpp
void register_attention(pybind11::module& m);  // attention.cpp
void register_quant_block(pybind11::module& m);  // quant_block.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_quant(m);
  register_attention(m);
  register_quant_block(m);
  m.def("skinny_linear", &skinny_linear, "y = x @ unpack(packed).T + bias (any M; built for small M)");
  m.def("isa", &isa_name, "instruction set selected at runtime");
  m.def("rms_norm", &rms_norm, "fp32-computed RMS norm of fp32/bf16 rows");
  m.def("panel_rows", &panel_rows, "unpacked rows of a packed weight (tied embeddings)");
  m.def("drafter_layer", &drafter_layer, "one MTP drafter layer for rows that see all their K/V (models/drafter.py)",
        py::arg("h"), py::arg("packed"), py::arg("norm_weights"), py::arg("eps"), py::arg("k"), py::arg("v"),
        py::arg("cos"), py::arg("sin"), py::arg("n_heads"), py::arg("layer_scalar"), py::arg("gelu"),
        py::arg("qmeta") = std::vector<std::vector<int64_t>>{});
  m.def("drafter_chain", &drafter_chain, "greedy MTP drafts in one call (each row reads all its K/V or its key span)");
  m.def("cluster_scores", &cluster_scores, "logits of the chosen clusters' tokens (clustered LM head)");
  m.def("force_isa", [](const std::string& name) {
    const Isa want = name == "avx2" ? AVX2 : name == "avx512" ? AVX512 : g_detected;
    g_isa = std::min(want, g_detected);
    return isa_name();
  }, "lower the ISA for testing: 'avx2', 'avx512', or 'auto'");
}
