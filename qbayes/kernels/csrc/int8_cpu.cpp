// Fused activation quantization and dequantize epilogues for qbayes's int8 (W8A8) CPU layers
// (qbayes.kernels.int8_quantize).
//
// The codes must equal the activation quantizer's (qbayes.nn.ActQuant / qbayes.formats) bit for
// bit, so every step is the float32 operation torch performs there, in the same order:
//   lo = min(min_k x, 0), hi = max(max_k x, 0)
//   asymmetric: s = (hi - lo) / (2^b - 1), s = s > 0 ? s : 1, z = clamp(rint(-lo / s), 0, 2^b - 1)
//   symmetric:  s = max(-lo, hi) / (2^(b-1) - 1), s = s > 0 ? s : 1, z = 2^(b-1)
//   c = clamp(rint(x / s) + z, 0, 2^b - 1)
// with rint rounding half to even, and true IEEE division (never a reciprocal multiply: the build
// uses no fast-math flag and -ffp-contract=off). A row is read twice (range, then codes) while it
// sits in cache; rows are spread over torch's intra-op threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.device().is_cpu(), name,
              ": contiguous float32 CPU tensor");
}

void row_minmax(const float* v, int64_t K, float& mn, float& mx) {
  int64_t k = 0;
  float lo = v[0], hi = v[0];
#ifdef __AVX2__
  if (K >= 8) {
    __m256 vlo = _mm256_loadu_ps(v), vhi = vlo;
    for (k = 8; k + 8 <= K; k += 8) {
      const __m256 a = _mm256_loadu_ps(v + k);
      vlo = _mm256_min_ps(vlo, a);
      vhi = _mm256_max_ps(vhi, a);
    }
    alignas(32) float bl[8], bh[8];
    _mm256_store_ps(bl, vlo);
    _mm256_store_ps(bh, vhi);
    for (int i = 0; i < 8; ++i) {
      lo = std::min(lo, bl[i]);
      hi = std::max(hi, bh[i]);
    }
  }
#endif
  for (; k < K; ++k) {
    lo = std::min(lo, v[k]);
    hi = std::max(hi, v[k]);
  }
  mn = lo;
  mx = hi;
}

// params_from_range(lo, hi, bits, symmetric, None) in float32
void range_params(float mn, float mx, int bits, bool symmetric, float& scale, float& zero) {
  const float lo = std::min(mn, 0.0f), hi = std::max(mx, 0.0f);
  const float top = static_cast<float>((1 << bits) - 1);
  float s;
  if (symmetric) {
    s = std::max(-lo, hi) / static_cast<float>((1 << (bits - 1)) - 1);
    s = s > 0.0f ? s : 1.0f;
    zero = static_cast<float>(1 << (bits - 1));
  } else {
    s = (hi - lo) / top;
    s = s > 0.0f ? s : 1.0f;
    zero = std::min(std::max(std::nearbyint(-lo / s), 0.0f), top);
  }
  scale = s;
}

// c[k] = clamp(rint(v[k] / s) + z, 0, top), stored as uint8 (or as int8 c - 128 when shift)
void row_codes(const float* v, int64_t K, float s, float z, float top, bool shift, uint8_t* c) {
  int64_t k = 0;
  const uint8_t flip = shift ? 0x80 : 0;
#ifdef __AVX2__
  const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z), v0 = _mm256_setzero_ps(), vt = _mm256_set1_ps(top);
  auto q8 = [&](const float* p) {
    __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(p), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(q, vz), v0), vt);
    return _mm256_cvtps_epi32(q);  // exact: an integer in [0, 255]
  };
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i vflip = _mm256_set1_epi8(static_cast<char>(flip));
  for (; k + 32 <= K; k += 32) {
    const __m256i p01 = _mm256_packus_epi32(q8(v + k), q8(v + k + 8));
    const __m256i p23 = _mm256_packus_epi32(q8(v + k + 16), q8(v + k + 24));
    __m256i p = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(p01, p23), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + k), _mm256_xor_si256(p, vflip));
  }
  for (; k + 8 <= K; k += 8) {
    const __m256i i = q8(v + k);
    const __m128i p16 = _mm_packus_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    const __m128i p8 = _mm_xor_si128(_mm_packus_epi16(p16, p16), _mm256_castsi256_si128(vflip));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(c + k), p8);
  }
#endif
  for (; k < K; ++k) {
    const float q = std::min(std::max(std::nearbyint(v[k] / s) + z, 0.0f), top);
    c[k] = static_cast<uint8_t>(static_cast<int>(q)) ^ flip;
  }
}

torch::Tensor new_codes(const torch::Tensor& x, bool shift) {
  return torch::empty(x.sizes(), x.options().dtype(shift ? torch::kInt8 : torch::kUInt8));
}

// Dynamic per-row (per-token) quantization of x (M, K): codes (M, K), scale (M, 1), zero (M, 1)
// float32. smooth (K,) float32, if given, multiplies x first (SmoothQuant), as x * smooth in float32.
std::vector<torch::Tensor> quantize_rows(torch::Tensor x, c10::optional<torch::Tensor> smooth, int64_t bits,
                                         bool symmetric, bool shift) {
  check_f32(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0, "x: (M, K) with K > 0");
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits: 2..8");
  const int64_t M = x.size(0), K = x.size(1);
  const float* sm = nullptr;
  if (smooth.has_value()) {
    check_f32(*smooth, "smooth");
    TORCH_CHECK(smooth->numel() == K, "smooth: one factor per column");
    sm = smooth->data_ptr<float>();
  }
  auto codes = new_codes(x, shift);
  auto scale = torch::empty({M, 1}, x.options());
  auto zero = torch::empty({M, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  uint8_t* cp = reinterpret_cast<uint8_t*>(codes.data_ptr());
  float* sp = scale.data_ptr<float>();
  float* zp = zero.data_ptr<float>();
  const float top = static_cast<float>((1 << bits) - 1);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(sm ? K : 0);
    for (int64_t m = begin; m < end; ++m) {
      const float* v = xp + m * K;
      if (sm) {
        for (int64_t k = 0; k < K; ++k) buf[k] = v[k] * sm[k];
        v = buf.data();
      }
      float mn, mx, s, z;
      row_minmax(v, K, mn, mx);
      range_params(mn, mx, static_cast<int>(bits), symmetric, s, z);
      row_codes(v, K, s, z, top, shift, cp + m * K);
      sp[m] = s;
      zp[m] = z;
    }
  });
  return {codes, scale, zero};
}

// Codes of any float32 tensor (contiguous or channels-last) for one (scale, zero), same layout.
torch::Tensor quantize_tensor(torch::Tensor x, double scale, double zero, int64_t bits, bool shift) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.device().is_cpu(), "x: float32 CPU tensor");
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast), "x: dense layout");
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits: 2..8");
  auto codes = torch::empty_like(x, x.options().dtype(shift ? torch::kInt8 : torch::kUInt8));
  const float* xp = x.data_ptr<float>();
  uint8_t* cp = reinterpret_cast<uint8_t*>(codes.data_ptr());
  const float s = static_cast<float>(scale), z = static_cast<float>(zero), top = static_cast<float>((1 << bits) - 1);
  at::parallel_for(0, x.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    row_codes(xp + begin, end - begin, s, z, top, shift, cp + begin);
  });
  return codes;
}

// min and max of x (as a float32 pair): the range of a dynamic per-tensor quantizer
std::vector<double> tensor_minmax(torch::Tensor x) {
  check_f32(x, "x");
  TORCH_CHECK(x.numel() > 0, "x: not empty");
  const int64_t n = x.numel(), chunk = 1 << 16, parts = (n + chunk - 1) / chunk;
  std::vector<float> lo(parts), hi(parts);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) row_minmax(xp + p * chunk, std::min(chunk, n - p * chunk), lo[p], hi[p]);
  });
  return {*std::min_element(lo.begin(), lo.end()), *std::max_element(hi.begin(), hi.end())};
}

// y (M, N) float32 = (acc - dz[m] colsum[n]) * (s[m] w_scale[n]) + bias[n], acc int32 (exact) or
// float32 holding integers; written in place for a float32 acc.
torch::Tensor row_epilogue(torch::Tensor acc, torch::Tensor s, torch::Tensor dz, torch::Tensor colsum,
                           torch::Tensor w_scale, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(acc.dim() == 2 && acc.is_contiguous() && acc.device().is_cpu(), "acc: contiguous (M, N)");
  const bool is_int = acc.scalar_type() == torch::kInt32;
  TORCH_CHECK(is_int || acc.scalar_type() == torch::kFloat32, "acc: int32 or float32");
  const int64_t M = acc.size(0), N = acc.size(1);
  check_f32(s, "s");
  check_f32(w_scale, "w_scale");
  TORCH_CHECK(dz.scalar_type() == torch::kInt32 && dz.is_contiguous() && dz.numel() == M, "dz: int32 (M,)");
  TORCH_CHECK(colsum.scalar_type() == torch::kInt32 && colsum.is_contiguous() && colsum.numel() == N,
              "colsum: int32 (N,)");
  TORCH_CHECK(s.numel() == M && w_scale.numel() == N, "s (M,), w_scale (N,)");
  const float* bp = nullptr;
  if (bias.has_value()) {
    check_f32(*bias, "bias");
    TORCH_CHECK(bias->numel() == N, "bias: (N,)");
    bp = bias->data_ptr<float>();
  }
  auto y = is_int ? torch::empty({M, N}, acc.options().dtype(torch::kFloat32)) : acc;
  const float* spp = s.data_ptr<float>();
  const int32_t* dzp = dz.data_ptr<int32_t>();
  const int32_t* csp = colsum.data_ptr<int32_t>();
  const float* wsp = w_scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float sm = spp[m];
      const int32_t d = dzp[m];
      float* yr = yp + m * N;
      if (is_int) {
        // |acc|, |d colsum| <= 128 * 128 * K < 2^30 and |A| < 2^31 (K <= 65000): no int32 overflow
        const int32_t* ar = acc.data_ptr<int32_t>() + m * N;
        if (bp) {
          for (int64_t n = 0; n < N; ++n) yr[n] = static_cast<float>(ar[n] - d * csp[n]) * (sm * wsp[n]) + bp[n];
        } else {
          for (int64_t n = 0; n < N; ++n) yr[n] = static_cast<float>(ar[n] - d * csp[n]) * (sm * wsp[n]);
        }
      } else {
        const float fd = static_cast<float>(d);
        if (bp) {
          for (int64_t n = 0; n < N; ++n) yr[n] = (yr[n] - fd * static_cast<float>(csp[n])) * (sm * wsp[n]) + bp[n];
        } else {
          for (int64_t n = 0; n < N; ++n) yr[n] = (yr[n] - fd * static_cast<float>(csp[n])) * (sm * wsp[n]);
        }
      }
    }
  });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_rows", &quantize_rows, "dynamic per-row activation codes with their scales and zero-points");
  m.def("quantize_tensor", &quantize_tensor, "activation codes for one scale and zero-point");
  m.def("tensor_minmax", &tensor_minmax, "min and max of a float32 tensor");
  m.def("row_epilogue", &row_epilogue, "(acc - dz colsum) * s * w_scale + bias, per-row s and dz");
}
