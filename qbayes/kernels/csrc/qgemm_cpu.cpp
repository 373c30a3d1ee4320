// Packed low-bit weight x float32 activations on the CPU (AVX2 + FMA + F16C).
//
// Weights: qweight uint8 (N, K*bits/8), codes little-endian in each byte (code i*cpc + j of a
// row sits in byte i at bit j*bits, cpc = 8/bits codes per byte); scales float16 (N, G); zero
// points packed the same way along the G groups (or absent: symmetric, zero 2^(bits-1)).
// w[n, k] = (code - zero[n, k/gs]) * scale[n, k/gs]  -- exactly the reference dequantization.
//
// y[m, n] = sum_k x[m, k] w[n, k]. Each 8-byte load of a row holds 8*cpc codes; its j-th
// bit-field across the 8 bytes is the codes i*cpc + j, i = 0..7, so x is permuted once per call
// into that order (xp) and every code is decoded with one shift/and per 8 lanes. A group is
// decoded into registers/L1 once and used for every row m of x.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstring>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// sum_v w[v] * x[8v..8v+7] over nv vectors, two independent FMA chains
inline __m256 dot_group(const __m256* w, const float* x, int64_t nv) {
  __m256 d0 = _mm256_setzero_ps(), d1 = d0;
  int64_t v = 0;
  for (; v + 2 <= nv; v += 2) {
    d0 = _mm256_fmadd_ps(w[v], _mm256_loadu_ps(x + 8 * v), d0);
    d1 = _mm256_fmadd_ps(w[v + 1], _mm256_loadu_ps(x + 8 * v + 8), d1);
  }
  for (; v < nv; ++v) d0 = _mm256_fmadd_ps(w[v], _mm256_loadu_ps(x + 8 * v), d0);
  return _mm256_add_ps(d0, d1);
}

template <int BITS>
inline int zero_of(const uint8_t* qz_row, int g) {
  if (qz_row == nullptr) return 1 << (BITS - 1);
  constexpr int cpc = 8 / BITS;
  return (qz_row[g / cpc] >> (BITS * (g % cpc))) & ((1 << BITS) - 1);
}

// Zero-points of the 8 groups g8..g8+7 (g8 a multiple of 8) of a packed row, in natural order:
// each byte is repeated once per code it holds, then every lane shifts its own field down.
template <int BITS>
inline __m256 zeros8(const uint8_t* zrow, int64_t g8) {
  constexpr int cpc = 8 / BITS;
  const uint8_t* p = zrow + g8 / cpc;
  __m128i v;
  if (BITS == 8) {
    v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  } else if (BITS == 4) {
    uint32_t w;
    std::memcpy(&w, p, 4);
    v = _mm_unpacklo_epi8(_mm_cvtsi32_si128(static_cast<int>(w)), _mm_cvtsi32_si128(static_cast<int>(w)));
  } else {
    uint16_t w;
    std::memcpy(&w, p, 2);
    v = _mm_cvtsi32_si128(w);
    v = _mm_unpacklo_epi8(v, v);
    v = _mm_unpacklo_epi8(v, v);
  }
  __m256i b = _mm256_cvtepu8_epi32(v);
  if (BITS != 8) {
    const __m256i sh = BITS == 4 ? _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4) : _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    b = _mm256_and_si256(_mm256_srlv_epi32(b, sh), _mm256_set1_epi32((1 << BITS) - 1));
  }
  return _mm256_cvtepi32_ps(b);
}

// Decode 8 bytes (8*cpc codes) into cpc vectors of 8 floats: (code - z) * s, in xp order.
template <int BITS>
inline void decode8(const uint8_t* p, __m256 z, __m256 s, __m256* out) {
  constexpr int cpc = 8 / BITS;
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#pragma GCC unroll 4
  for (int j = 0; j < cpc; ++j) {
    __m256i c = BITS == 8 ? b : _mm256_and_si256(_mm256_srli_epi32(b, j * BITS), mask);
    out[j] = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(c), z), s);
  }
}

// Decode 8 bytes (8*cpc codes) into cpc vectors of 8 float codes (no scale, no zero), xp order.
template <int BITS>
inline void codes8(const uint8_t* p, __m256* out) {
  constexpr int cpc = 8 / BITS;
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#pragma GCC unroll 4
  for (int j = 0; j < cpc; ++j)
    out[j] = _mm256_cvtepi32_ps(BITS == 8 ? b
                                : j == cpc - 1 ? _mm256_srli_epi32(b, j * BITS)  // top field: no mask needed
                                               : _mm256_and_si256(_mm256_srli_epi32(b, j * BITS), mask));
}

// 32 codes (32*BITS/8 bytes) as 4 vectors of 8 float codes, in xp order.
template <int BITS>
inline void codes32(const uint8_t* p, __m256* w) {
  constexpr int cpc = 8 / BITS;
#pragma GCC unroll 4
  for (int i = 0; i < 4 / cpc; ++i) codes8<BITS>(p + 8 * i, w + cpc * i);
}

// 3-bit codes: a row is one little-endian bit stream (code k at bit 3k), so 8 codes fill exactly
// 3 bytes and a code may straddle two bytes. Lanes hold consecutive codes (no x permutation):
// the 24 bits of an octet are broadcast and each lane shifts its own field down.
inline int zero_of3(const uint8_t* zr, int64_t g) {
  if (zr == nullptr) return 4;
  const int64_t bit = 3 * g, b = bit >> 3;
  const int sh = static_cast<int>(bit & 7);
  int v = zr[b] >> sh;
  if (sh > 5) v |= zr[b + 1] << (8 - sh);
  return v & 7;
}

// 32 codes (12 bytes at p) as 4 vectors of 8 float codes in natural order. The 12 bytes are read
// with one 16-byte load (copied through a buffer where fewer than 16 bytes remain before end);
// octet i is placed in every 32-bit lane by a byte shuffle, then each lane shifts its own field.
inline void codes32_3(const uint8_t* p, const uint8_t* end, __m256* w) {
  __m128i raw;
  if (p + 16 <= end) {
    raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else {
    alignas(16) uint8_t buf[16] = {0};
    std::memcpy(buf, p, 12);
    raw = _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
  }
  const __m256i v = _mm256_broadcastsi128_si256(raw);
  const __m256i sh = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21), m7 = _mm256_set1_epi32(7);
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const int b = 3 * i;  // lane bytes (b, b+1, b+2, zero)
    const __m256i pick = _mm256_set1_epi32(static_cast<int>(0x80000000u | ((b + 2) << 16) | ((b + 1) << 8) | b));
    w[i] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(v, pick), sh), m7));
  }
}

// Rows [n0, n1) of y = x W^T for 3-bit W, any number of rows of x (a group is decoded once and
// used for every row): y[m, n] = sum_g s (sum_k c x - z xsum_g).
void rows3(const float* x, const float* xsum, int64_t M, int64_t K, const uint8_t* qw, const uint16_t* sc,
           const uint8_t* qz, int64_t G, int64_t gs, float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t row_bytes = K * 3 / 8, zbytes = (G + 7) / 8 * 3 /* packed_length: 8 codes per 3 bytes */, nv = gs / 8;
  const uint8_t* end = qw + N * row_bytes;
  std::vector<__m256> wbuf(nv), acc(M);
  std::vector<float> corr(M);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = qw + n * row_bytes;
    const uint8_t* zrow = qz ? qz + n * zbytes : nullptr;
    for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps(), corr[m] = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      const float s = half_to_float(sc[n * G + g]);
      const float sz = s * static_cast<float>(zero_of3(zrow, g));
      const __m256 sv = _mm256_set1_ps(s);
      const uint8_t* p = row + g * gs * 3 / 8;
      for (int64_t c = 0; c < gs; c += 32) codes32_3(p + c * 3 / 8, end, &wbuf[c / 8]);
      for (int64_t m = 0; m < M; ++m) {
        const float* xg = x + m * K + g * gs;
        acc[m] = _mm256_fmadd_ps(sv, dot_group(wbuf.data(), xg, nv), acc[m]);
        corr[m] += sz * xsum[m * G + g];
      }
    }
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = hsum(acc[m]) - corr[m];
  }
}

// Blocks of 64 3-bit codes (24 bytes): a byte shuffle puts octet j (codes 8j..8j+7) in lane j of
// one register, so code 8j+i of every lane is one immediate shift and mask away; x is permuted
// once per call so that xp[b + 8i + j] = x[b + 8j + i] meets it. Lanes 0-3 and 4-7 each lie in
// one 32-code half of the block, so their scales are set per half (any group size that is a
// multiple of 32). Needs K % 64 == 0.
inline void block64_3(const uint8_t* p, const uint8_t* end, __m256* w) {
  __m128i lo, hi;
  if (p + 28 <= end) {
    lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 12));
  } else {
    alignas(16) uint8_t buf[32] = {0};
    std::memcpy(buf, p, 24);
    lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(buf));
    hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(buf + 12));
  }
  const __m256i pick = _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,
                                        0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
  const __m256i v = _mm256_shuffle_epi8(_mm256_set_m128i(hi, lo), pick), m7 = _mm256_set1_epi32(7);
  w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(v, m7));
  w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 3), m7));
  w[2] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 6), m7));
  w[3] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 9), m7));
  w[4] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 12), m7));
  w[5] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 15), m7));
  w[6] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 18), m7));
  w[7] = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 21));
}

void rows3_fast(const float* xp, const float* xsum, int64_t M, int64_t K, const uint8_t* qw, const uint16_t* sc,
                const uint8_t* qz, int64_t G, int64_t gs, float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t row_bytes = K * 3 / 8, zbytes = (G + 7) / 8 * 3 /* packed_length: 8 codes per 3 bytes */;
  const uint8_t* end = qw + N * row_bytes;
  std::vector<__m256> acc(M);
  std::vector<float> sbuf(G);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = qw + n * row_bytes;
    const uint8_t* zrow = qz ? qz + n * zbytes : nullptr;
    float corr = 0.f;  // sum_g s_g z_g xsum_mg, per row m below
    for (int64_t g = 0; g < G; ++g) sbuf[g] = half_to_float(sc[n * G + g]);
    for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < K; b += 64) {
      const uint8_t* p = row + b * 3 / 8;
      _mm_prefetch(reinterpret_cast<const char*>(p) + 2048, _MM_HINT_T0);
      __m256 w[8];
      block64_3(p, end, w);
      const __m256 sv = _mm256_set_m128(_mm_set1_ps(sbuf[(b + 32) / gs]), _mm_set1_ps(sbuf[b / gs]));
      for (int64_t m = 0; m < M; ++m) {
        const float* xb = xp + m * K + b;
        __m256 d0 = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb));
        __m256 d1 = _mm256_mul_ps(w[1], _mm256_loadu_ps(xb + 8));
        d0 = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + 16), d0);
        d1 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), d1);
        d0 = _mm256_fmadd_ps(w[4], _mm256_loadu_ps(xb + 32), d0);
        d1 = _mm256_fmadd_ps(w[5], _mm256_loadu_ps(xb + 40), d1);
        d0 = _mm256_fmadd_ps(w[6], _mm256_loadu_ps(xb + 48), d0);
        d1 = _mm256_fmadd_ps(w[7], _mm256_loadu_ps(xb + 56), d1);
        acc[m] = _mm256_fmadd_ps(sv, _mm256_add_ps(d0, d1), acc[m]);
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      corr = 0.f;
      for (int64_t g = 0; g < G; ++g) corr += sbuf[g] * static_cast<float>(zero_of3(zrow, g)) * xsum[m * G + g];
      y[m * N + n] = hsum(acc[m]) - corr;
    }
  }
}

// Dense float32 rows [n0, n1) of a 3-bit weight into out (row stride K), (c - z) * s as the reference.
void dequant3_rows(const uint8_t* qwp, const uint16_t* scp, const uint8_t* qzp, int64_t K, int64_t G, int64_t gs,
                   int64_t n0, int64_t n1, float* out) {
  const int64_t row_bytes = K * 3 / 8, zbytes = (G + 7) / 8 * 3 /* packed_length: 8 codes per 3 bytes */;
  const uint8_t* end = qwp + n1 * row_bytes;  // rows past n1 may not exist: never read beyond row n1 - 1
  __m256 w[4];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* zrow = qzp ? qzp + n * zbytes : nullptr;
    float* orow = out + (n - n0) * K;
    for (int64_t g = 0; g < G; ++g) {
      const __m256 s = _mm256_set1_ps(half_to_float(scp[n * G + g]));
      const __m256 z = _mm256_set1_ps(static_cast<float>(zero_of3(zrow, g)));
      const uint8_t* p = qwp + n * row_bytes + g * gs * 3 / 8;
      for (int64_t c = 0; c < gs; c += 32) {
        codes32_3(p + c * 3 / 8, end, w);
        for (int i = 0; i < 4; ++i) _mm256_storeu_ps(orow + g * gs + c + 8 * i, _mm256_mul_ps(_mm256_sub_ps(w[i], z), s));
      }
    }
  }
}

void add_bias(float* yp, const c10::optional<torch::Tensor>& bias, int64_t M, int64_t N) {
  if (!bias.has_value()) return;
  // float32 or the float16 QuantLinear stores by default: no conversion op per call
  const bool half = bias->scalar_type() == torch::kFloat16;
  const float* bp = half ? nullptr : bias->data_ptr<float>();
  const uint16_t* hp = half ? reinterpret_cast<const uint16_t*>(bias->data_ptr<at::Half>()) : nullptr;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) yp[m * N + n] += half ? half_to_float(hp[n]) : bp[n];
}

torch::Tensor run3(const torch::Tensor& x, const torch::Tensor& qw, const torch::Tensor& sc,
                   const c10::optional<torch::Tensor>& qz, const c10::optional<torch::Tensor>& bias, int64_t gs) {
  const int64_t M = x.size(0), K = x.size(1), N = qw.size(0), G = sc.size(1);
  const float* xs = x.data_ptr<float>();
  thread_local std::vector<float> xsum_buf;
  xsum_buf.resize(M * G);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      __m256 a = _mm256_setzero_ps();
      for (int64_t k = g * gs; k < (g + 1) * gs; k += 8) a = _mm256_add_ps(a, _mm256_loadu_ps(xs + m * K + k));
      xsum_buf[m * G + g] = hsum(a);
    }
  auto y = torch::empty({M, N}, x.options());
  const uint8_t* qwp = qw.data_ptr<uint8_t>();
  const uint16_t* scp = reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>());
  const uint8_t* qzp = qz.has_value() ? qz->data_ptr<uint8_t>() : nullptr;
  float* yp = y.data_ptr<float>();
  const float* xsum = xsum_buf.data();
  if (K % 64 == 0) {  // permute x for the 64-code blocks: xp[b + 8i + j] = x[b + 8j + i]
    thread_local std::vector<float> xp_buf;
    xp_buf.resize(M * K);
    float* xp = xp_buf.data();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < K; b += 64)
        for (int i = 0; i < 8; ++i)
          for (int j = 0; j < 8; ++j) xp[m * K + b + 8 * i + j] = xs[m * K + b + 8 * j + i];
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      rows3_fast(xp, xsum, M, K, qwp, scp, qzp, G, gs, yp, N, n0, n1);
    });
  } else {
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { rows3(xs, xsum, M, K, qwp, scp, qzp, G, gs, yp, N, n0, n1); });
  }
  add_bias(yp, bias, M, N);
  return y;
}

// y[m, n] = sum_g s_ng (sum_{k in g} c_nk x_mk - z_ng xsum_mg): the scale and zero-point leave
// the inner loop, which is then one shift/and/convert and one FMA per 8 weights. Independent
// accumulators (a tile of up to 8 rows of x) keep the FMA pipes busy
// instead of waiting on one dependency chain.
// One row of x (decoding): per weight row, the scales are converted 8 at a time and the
// zero-point correction sum_g s z xsum_g is taken once, so a group costs its decode/FMA loop, one
// horizontal-free reduction of 4 accumulators and one FMA into the row's accumulator.
template <int BITS, int GS_FIXED>
void gemv_rows(const float* xp, const float* xsum, int64_t K, const uint8_t* qw, const uint16_t* sc,
               const uint8_t* qz, int64_t G, int64_t gs_runtime, float* y, int64_t n0, int64_t n1) {
  // GS_FIXED > 0: the group size is a compile-time constant and the code loop unrolls fully
  constexpr int cpc = 8 / BITS;
  const int64_t gs = GS_FIXED > 0 ? GS_FIXED : gs_runtime;
  const int64_t row_bytes = K / cpc, zbytes = (G + cpc - 1) / cpc;
  thread_local std::vector<float> sbuf;
  sbuf.resize(G + 8);
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* srow = sc + n * G;
    int64_t g8 = 0;
    for (; g8 + 8 <= G; g8 += 8)
      _mm256_storeu_ps(&sbuf[g8], _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(srow + g8))));
    for (; g8 < G; ++g8) sbuf[g8] = half_to_float(srow[g8]);
    const uint8_t* zrow = qz ? qz + n * zbytes : nullptr;
    // zero-point correction sum_g s_g z_g xsum_g, 8 groups per step
    __m256 cv = _mm256_setzero_ps();
    int64_t g0 = 0;
    for (; g0 + 8 <= G; g0 += 8) {
      const __m256 z8 = zrow ? zeros8<BITS>(zrow, g0) : _mm256_set1_ps(static_cast<float>(1 << (BITS - 1)));
      cv = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(&sbuf[g0]), z8), _mm256_loadu_ps(xsum + g0), cv);
    }
    float corr = hsum(cv);
    for (; g0 < G; ++g0) corr += sbuf[g0] * static_cast<float>(zero_of<BITS>(zrow, static_cast<int>(g0))) * xsum[g0];
    const uint8_t* row = qw + n * row_bytes;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t* p = row + g * gs / cpc;
      const float* xg = xp + g * gs;
      // software prefetch 2 KB ahead on the weight stream (A/B on this machine, interleaved rounds:
      // 8-bit 4096x14336 3.67x -> 4.64x fp32, 14336x4096 3.54x -> 3.95x; 4-bit 4.38x -> 5.61x)
      _mm_prefetch(reinterpret_cast<const char*>(p) + 2048, _MM_HINT_T0);
      if (gs / cpc > 64) _mm_prefetch(reinterpret_cast<const char*>(p) + 2048 + 64, _MM_HINT_T0);
      __m256 d0 = _mm256_setzero_ps(), d1 = d0, d2 = d0, d3 = d0;
#pragma GCC unroll 4
      for (int64_t c = 0; c < gs; c += 32) {
        __m256 w[4];
        codes32<BITS>(p + c / cpc, w);
        d0 = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xg + c), d0);
        d1 = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xg + c + 8), d1);
        d2 = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xg + c + 16), d2);
        d3 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xg + c + 24), d3);
      }
      acc = _mm256_fmadd_ps(_mm256_set1_ps(sbuf[g]), _mm256_add_ps(_mm256_add_ps(d0, d1), _mm256_add_ps(d2, d3)), acc);
    }
    y[n] = hsum(acc) - corr;
  }
}

template <int BITS>
void gemv_dispatch(const float* xp, const float* xsum, int64_t K, const uint8_t* qw, const uint16_t* sc,
                   const uint8_t* qz, int64_t G, int64_t gs, float* y, int64_t n0, int64_t n1) {
  switch (gs) {
    case 32: return gemv_rows<BITS, 32>(xp, xsum, K, qw, sc, qz, G, gs, y, n0, n1);
    case 64: return gemv_rows<BITS, 64>(xp, xsum, K, qw, sc, qz, G, gs, y, n0, n1);
    case 128: return gemv_rows<BITS, 128>(xp, xsum, K, qw, sc, qz, G, gs, y, n0, n1);
    default: return gemv_rows<BITS, 0>(xp, xsum, K, qw, sc, qz, G, gs, y, n0, n1);
  }
}

template <int BITS>
void gemm_rows(const float* xp, const float* xsum, int64_t M, int64_t K, const uint8_t* qw, const uint16_t* sc,
               const uint8_t* qz, int64_t G, int64_t gs, float* y, int64_t N, int64_t n0, int64_t n1) {
  constexpr int cpc = 8 / BITS;
  const int64_t row_bytes = K / cpc, zbytes = (G + cpc - 1) / cpc;
  std::vector<__m256> acc(M);
  std::vector<float> corr(M);
  std::vector<__m256> wbuf(gs / 8);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = qw + n * row_bytes;
    const uint8_t* zrow = qz ? qz + n * zbytes : nullptr;
    for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps(), corr[m] = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      const float s = half_to_float(sc[n * G + g]);
      const float sz = s * static_cast<float>(zero_of<BITS>(zrow, static_cast<int>(g)));
      const __m256 sv = _mm256_set1_ps(s);
      const uint8_t* p = row + g * gs / cpc;
      {  // M > 1 (one row goes to gemv_rows)
        for (int64_t c = 0; c < gs; c += 32) codes32<BITS>(p + c / cpc, &wbuf[c / 8]);
        const int64_t nv = gs / 8;
        int64_t m = 0;
        for (; m + 8 <= M; m += 8) {  // a tile of 8 rows: 8 independent chains
          __m256 d[8];
          for (int t = 0; t < 8; ++t) d[t] = _mm256_setzero_ps();
          const float* xg = xp + m * K + g * gs;
          for (int64_t v = 0; v < nv; ++v) {
            const __m256 wv = wbuf[v];
#pragma GCC unroll 8
            for (int t = 0; t < 8; ++t) d[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xg + t * K + 8 * v), d[t]);
          }
          for (int t = 0; t < 8; ++t) {
            acc[m + t] = _mm256_fmadd_ps(sv, d[t], acc[m + t]);
            corr[m + t] += sz * xsum[(m + t) * G + g];
          }
        }
        for (; m < M; ++m) {
          const float* xg = xp + m * K + g * gs;
          acc[m] = _mm256_fmadd_ps(sv, dot_group(wbuf.data(), xg, nv), acc[m]);
          corr[m] += sz * xsum[m * G + g];
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) y[m * N + n] = hsum(acc[m]) - corr[m];
  }
}

template <int BITS>
torch::Tensor run(const torch::Tensor& x, const torch::Tensor& qw, const torch::Tensor& sc,
                  const c10::optional<torch::Tensor>& qz, const c10::optional<torch::Tensor>& bias, int64_t gs) {
  constexpr int cpc = 8 / BITS;
  const int64_t M = x.size(0), K = x.size(1), N = qw.size(0), G = sc.size(1);
  const int64_t chunk = 8 * cpc;
  // permute x so that each 8-byte load's j-th bit-field meets its activations contiguously, and
  // sum it per group (for the zero-points); plain buffers: no ATen dispatch on this hot path
  thread_local std::vector<float> xp_buf, xsum_buf;
  xp_buf.resize(M * K);
  xsum_buf.resize(M * G);
  const float* xs = x.data_ptr<float>();
  float* xp = xp_buf.data();
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t c = 0; c < K; c += chunk)
      for (int j = 0; j < cpc; ++j)
        for (int i = 0; i < 8; ++i) xp[m * K + c + j * 8 + i] = xs[m * K + c + i * cpc + j];
    for (int64_t g = 0; g < G; ++g) {
      __m256 a = _mm256_setzero_ps();
      for (int64_t k = g * gs; k < (g + 1) * gs; k += 8) a = _mm256_add_ps(a, _mm256_loadu_ps(xs + m * K + k));
      xsum_buf[m * G + g] = hsum(a);
    }
  }
  const float* xsum = xsum_buf.data();
  auto y = torch::empty({M, N}, x.options());
  const uint8_t* qwp = qw.data_ptr<uint8_t>();
  const uint16_t* scp = reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>());
  const uint8_t* qzp = qz.has_value() ? qz->data_ptr<uint8_t>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    if (M == 1) gemv_dispatch<BITS>(xp, xsum, K, qwp, scp, qzp, G, gs, yp, n0, n1);
    else gemm_rows<BITS>(xp, xsum, M, K, qwp, scp, qzp, G, gs, yp, N, n0, n1);
  });
  add_bias(yp, bias, M, N);
  return y;
}

torch::Tensor qgemm(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                    c10::optional<torch::Tensor> qzeros, int64_t bits, int64_t group_size,
                    c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32 (M, K)");
  TORCH_CHECK(qweight.scalar_type() == torch::kUInt8 && qweight.is_contiguous(), "qweight: contiguous uint8");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat16 && scales.is_contiguous(), "scales: contiguous float16");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8");
  const int64_t K = x.size(1);
  TORCH_CHECK(group_size % 32 == 0 && K % group_size == 0, "group size must be a multiple of 32 dividing K");
  TORCH_CHECK(qweight.size(1) * 8 == K * bits, "qweight width does not match K");
  TORCH_CHECK(scales.size(0) == qweight.size(0) && scales.size(1) == K / group_size, "scales shape");
  if (qzeros.has_value()) TORCH_CHECK(qzeros->scalar_type() == torch::kUInt8 && qzeros->is_contiguous(), "qzeros: uint8");
  if (bias.has_value())
    TORCH_CHECK((bias->scalar_type() == torch::kFloat32 || bias->scalar_type() == torch::kFloat16) &&
                bias->is_contiguous() && bias->numel() == qweight.size(0), "bias: contiguous float32/float16 (N,)");
  switch (bits) {
    case 2: return run<2>(x, qweight, scales, qzeros, bias, group_size);
    case 3: return run3(x, qweight, scales, qzeros, bias, group_size);
    case 4: return run<4>(x, qweight, scales, qzeros, bias, group_size);
    default: return run<8>(x, qweight, scales, qzeros, bias, group_size);
  }
}


// Dense float32 rows [n0, n1) of the weight from the packed form, into out (row stride K).
template <int BITS>
void dequant_rows(const uint8_t* qwp, const uint16_t* scp, const uint8_t* qzp, int64_t K, int64_t G, int64_t gs,
                  int64_t n0, int64_t n1, float* out) {
  if constexpr (BITS == 3) {
    dequant3_rows(qwp, scp, qzp, K, G, gs, n0, n1, out);
    return;
  } else {
  constexpr int cpc = 8 / BITS;
  const int64_t row_bytes = K / cpc, zbytes = (G + cpc - 1) / cpc;
  __m256 w[cpc];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* zrow = qzp ? qzp + n * zbytes : nullptr;
    float* orow = out + (n - n0) * K;
    for (int64_t g = 0; g < G; ++g) {
      const __m256 s = _mm256_set1_ps(half_to_float(scp[n * G + g]));
      const __m256 z = _mm256_set1_ps(static_cast<float>(zero_of<BITS>(zrow, static_cast<int>(g))));
      const uint8_t* p = qwp + n * row_bytes + g * gs / cpc;
      float* o = orow + g * gs;
      for (int64_t c = 0; c < gs; c += 8 * cpc) {
        decode8<BITS>(p + c / cpc, z, s, w);
        if (BITS == 8) {
          _mm256_storeu_ps(o + c, w[0]);
        } else if (BITS == 4) {  // w[0] = codes 0,2,..,14 and w[1] = 1,3,..,15: interleave
          __m256 a = _mm256_unpacklo_ps(w[0], w[cpc - 1]), b = _mm256_unpackhi_ps(w[0], w[cpc - 1]);
          _mm256_storeu_ps(o + c, _mm256_permute2f128_ps(a, b, 0x20));
          _mm256_storeu_ps(o + c + 8, _mm256_permute2f128_ps(a, b, 0x31));
        } else {
          alignas(32) float t[8 * cpc];
          for (int j = 0; j < cpc; ++j) _mm256_store_ps(t + 8 * j, w[j]);
          for (int i = 0; i < 8; ++i)
            for (int j = 0; j < cpc; ++j) o[c + i * cpc + j] = t[8 * j + i];
        }
      }
    }
  }
  }  // BITS != 3
}

struct Packed {
  const uint8_t* qw;
  const uint16_t* sc;
  const uint8_t* qz;
};

inline Packed packed_ptrs(const torch::Tensor& qw, const torch::Tensor& sc, const c10::optional<torch::Tensor>& qz) {
  return {qw.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>()),
          qz.has_value() ? qz->data_ptr<uint8_t>() : nullptr};
}

template <int BITS>
torch::Tensor dequant_impl(const torch::Tensor& qw, const torch::Tensor& sc, const c10::optional<torch::Tensor>& qz,
                           int64_t K, int64_t gs) {
  const int64_t N = qw.size(0), G = sc.size(1);
  auto out = torch::empty({N, K}, torch::kFloat32);
  const Packed pk = packed_ptrs(qw, sc, qz);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    dequant_rows<BITS>(pk.qw, pk.sc, pk.qz, K, G, gs, n0, n1, op + n0 * K);
  });
  return out;
}

// A float32 buffer reused across calls on this thread: a fresh multi-MB allocation is mapped
// anew by malloc and costs a page fault per 4 KB, more than dequantizing into it.
inline torch::Tensor scratch(int64_t n) {
  thread_local torch::Tensor buf;
  if (!buf.defined() || buf.numel() < n) buf = torch::empty({n}, torch::kFloat32);
  return buf.narrow(0, 0, n);
}

// Many rows of x: dequantize a tile of weight rows into a reused buffer and multiply it with
// the GEMM of the BLAS, tile after tile (no full float weight, no page faults on a fresh one).
template <int BITS>
torch::Tensor tiled_impl(const torch::Tensor& x, const torch::Tensor& qw, const torch::Tensor& sc,
                         const c10::optional<torch::Tensor>& qz, int64_t gs, int64_t tile) {
  const int64_t M = x.size(0), K = x.size(1), N = qw.size(0), G = sc.size(1);
  const Packed pk = packed_ptrs(qw, sc, qz);
  if (tile >= N) {  // one tile: the whole weight, then the same GEMM as F.linear (x @ W.T)
    auto w = scratch(N * K).view({N, K});
    float* wp = w.data_ptr<float>();
    at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
      dequant_rows<BITS>(pk.qw, pk.sc, pk.qz, K, G, gs, n0, n1, wp + n0 * K);
    });
    return at::mm(x, w.t());
  }
  auto yT = torch::empty({N, M}, x.options());
  auto buf = scratch(std::min(tile, N) * K).view({std::min(tile, N), K});
  auto xT = x.t();
  for (int64_t t0 = 0; t0 < N; t0 += tile) {
    const int64_t t1 = std::min(N, t0 + tile);
    float* bp = buf.data_ptr<float>();
    at::parallel_for(t0, t1, 8, [&](int64_t n0, int64_t n1) {
      dequant_rows<BITS>(pk.qw, pk.sc, pk.qz, K, G, gs, n0, n1, bp + (n0 - t0) * K);
    });
    auto out = yT.narrow(0, t0, t1 - t0);
    at::mm_out(out, buf.narrow(0, 0, t1 - t0), xT);
  }
  return yT.t().contiguous();
}

torch::Tensor qgemm_tiled(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales,
                          c10::optional<torch::Tensor> qzeros, int64_t bits, int64_t group_size, int64_t tile) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous float32 (M, K)");
  TORCH_CHECK(qweight.scalar_type() == torch::kUInt8 && qweight.is_contiguous(), "qweight: contiguous uint8");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat16 && scales.is_contiguous(), "scales: contiguous float16");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8");
  TORCH_CHECK(group_size % 32 == 0 && x.size(1) % group_size == 0, "group size must be a multiple of 32 dividing K");
  TORCH_CHECK(qweight.size(1) * 8 == x.size(1) * bits, "qweight width does not match K");
  TORCH_CHECK(tile > 0, "tile must be positive");
  switch (bits) {
    case 2: return tiled_impl<2>(x, qweight, scales, qzeros, group_size, tile);
    case 3: return tiled_impl<3>(x, qweight, scales, qzeros, group_size, tile);
    case 4: return tiled_impl<4>(x, qweight, scales, qzeros, group_size, tile);
    default: return tiled_impl<8>(x, qweight, scales, qzeros, group_size, tile);
  }
}

torch::Tensor dequant(torch::Tensor qweight, torch::Tensor scales, c10::optional<torch::Tensor> qzeros, int64_t bits,
                      int64_t in_features, int64_t group_size) {
  TORCH_CHECK(qweight.scalar_type() == torch::kUInt8 && qweight.is_contiguous(), "qweight: contiguous uint8");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat16 && scales.is_contiguous(), "scales: contiguous float16");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8");
  const int64_t unit = bits == 3 ? 32 : 8 * (8 / bits);
  TORCH_CHECK(group_size % unit == 0 && in_features % group_size == 0, "group size must be a multiple of ", unit,
              " dividing K");
  TORCH_CHECK(qweight.size(1) * 8 == in_features * bits, "qweight width does not match K");
  switch (bits) {
    case 2: return dequant_impl<2>(qweight, scales, qzeros, in_features, group_size);
    case 3: return dequant_impl<3>(qweight, scales, qzeros, in_features, group_size);
    case 4: return dequant_impl<4>(qweight, scales, qzeros, in_features, group_size);
    default: return dequant_impl<8>(qweight, scales, qzeros, in_features, group_size);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qgemm", &qgemm, "packed low-bit weight GEMM (CPU, AVX2)");
  m.def("dequant", &dequant, "packed low-bit weight to dense float32 (CPU, AVX2)");
  m.def("qgemm_tiled", &qgemm_tiled, "packed low-bit weight GEMM for many rows: dequantized tiles x BLAS");
}
