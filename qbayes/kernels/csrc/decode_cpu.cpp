// Small fused float32 ops for batch-1 decoding on the CPU (qbayes.fastdecode.LlamaDecoder).
//
// At one token per step the work between the linear layers is tiny (a few thousand floats), so
// the cost of an ATen op is its dispatch and threading overhead, not its arithmetic: torch's
// rms_norm takes ~30 us and scaled_dot_product_attention ~55 us on 576-wide SmolLM2 rows here.
// These single-threaded loops do the same arithmetic in one call each.
#include <torch/extension.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace {

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.device().is_cpu(), name,
              ": contiguous float32 CPU tensor");
}

void rms_rows(const float* x, const float* w, float eps, int64_t T, int64_t C, float* y) {
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x + t * C;
    float ss = 0.f;
    for (int64_t c = 0; c < C; ++c) ss += xr[c] * xr[c];
    const float r = 1.f / std::sqrt(ss / static_cast<float>(C) + eps);
    float* yr = y + t * C;
    for (int64_t c = 0; c < C; ++c) yr[c] = w[c] * (xr[c] * r);
  }
}

// y = w * x / sqrt(mean(x^2) + eps), per row of x (T, C)
torch::Tensor rmsnorm(torch::Tensor x, torch::Tensor w, double eps) {
  check_f32(x, "x");
  check_f32(w, "w");
  const int64_t C = x.size(-1), T = x.numel() / C;
  TORCH_CHECK(w.numel() == C, "w: one weight per channel");
  auto y = torch::empty_like(x);
  rms_rows(x.data_ptr<float>(), w.data_ptr<float>(), static_cast<float>(eps), T, C, y.data_ptr<float>());
  return y;
}

// x += r (in place), then return rmsnorm(x)
torch::Tensor add_rmsnorm_(torch::Tensor x, torch::Tensor r, torch::Tensor w, double eps) {
  check_f32(x, "x");
  check_f32(r, "r");
  check_f32(w, "w");
  TORCH_CHECK(x.sizes() == r.sizes(), "x and r: same shape");
  const int64_t C = x.size(-1), T = x.numel() / C;
  TORCH_CHECK(w.numel() == C, "w: one weight per channel");
  float* xp = x.data_ptr<float>();
  const float* rp = r.data_ptr<float>();
  for (int64_t i = 0; i < T * C; ++i) xp[i] += rp[i];
  auto y = torch::empty_like(x);
  rms_rows(xp, w.data_ptr<float>(), static_cast<float>(eps), T, C, y.data_ptr<float>());
  return y;
}

// y (T, (H + 2 KVH) D) = [q | k | v] rows of positions pos..pos+T-1: rotary embedding on q and k
// in place (x cos + rotate_half(x) sin, with sin_signed = [-sin_a, sin_b] so rotate_half(x) sin
// = roll(x, D/2) sin_signed), then k and v into the caches kc, vc (KVH, L, D) at those positions.
void rope_cache_(torch::Tensor y, torch::Tensor cos, torch::Tensor sin_signed, torch::Tensor kc, torch::Tensor vc,
                 int64_t pos, int64_t H, int64_t KVH) {
  check_f32(y, "y");
  check_f32(cos, "cos");
  check_f32(sin_signed, "sin");
  check_f32(kc, "k cache");
  check_f32(vc, "v cache");
  const int64_t D = cos.size(1), L = kc.size(1), T = y.size(0), half = D / 2;
  TORCH_CHECK(y.size(1) == (H + 2 * KVH) * D, "y: (T, (H + 2 KVH) D)");
  TORCH_CHECK(kc.size(0) == KVH && kc.size(2) == D && vc.sizes() == kc.sizes(), "caches: (KVH, L, D)");
  TORCH_CHECK(pos >= 0 && pos + T <= L && pos + T <= cos.size(0), "positions beyond the cache");
  float* yp = y.data_ptr<float>();
  float* kp = kc.data_ptr<float>();
  float* vp = vc.data_ptr<float>();
  std::vector<float> tmp(D);
  for (int64_t t = 0; t < T; ++t) {
    const float* cr = cos.data_ptr<float>() + (pos + t) * D;
    const float* sr = sin_signed.data_ptr<float>() + (pos + t) * D;
    float* row = yp + t * y.size(1);
    for (int64_t h = 0; h < H + KVH; ++h) {
      float* x = row + h * D;
      for (int64_t d = 0; d < D; ++d) tmp[d] = x[d] * cr[d] + x[(d + half) % D] * sr[d];
      for (int64_t d = 0; d < D; ++d) x[d] = tmp[d];
    }
    for (int64_t h = 0; h < KVH; ++h) {
      std::memcpy(kp + (h * L + pos + t) * D, row + (H + h) * D, D * sizeof(float));
      std::memcpy(vp + (h * L + pos + t) * D, row + (H + KVH + h) * D, D * sizeof(float));
    }
  }
}

// One query row: o[h] = softmax(q_h . k[g(h), :n] * scale) v[g(h), :n], heads grouped over the
// KVH key/value heads (query head h uses kv head h / (H / KVH)). q: the first H*D of y (1, ...).
torch::Tensor attn_decode(torch::Tensor y, torch::Tensor kc, torch::Tensor vc, int64_t n, double scale, int64_t H,
                          int64_t KVH) {
  check_f32(y, "y");
  check_f32(kc, "k cache");
  check_f32(vc, "v cache");
  const int64_t L = kc.size(1), D = kc.size(2);
  TORCH_CHECK(y.size(0) == 1 && y.size(1) >= H * D, "y: one row holding the H query heads first");
  TORCH_CHECK(H % KVH == 0 && kc.size(0) == KVH && vc.sizes() == kc.sizes(), "caches: (KVH, L, D)");
  TORCH_CHECK(n >= 1 && n <= L, "n: 1..cache length");
  auto o = torch::empty({1, H * D}, y.options());
  const float* q = y.data_ptr<float>();
  const float* kp = kc.data_ptr<float>();
  const float* vp = vc.data_ptr<float>();
  float* op = o.data_ptr<float>();
  std::vector<float> s(n);
  const float sc = static_cast<float>(scale);
  for (int64_t h = 0; h < H; ++h) {
    const int64_t g = h / (H / KVH);
    const float* qh = q + h * D;
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
      const float* kj = kp + (g * L + j) * D;
      float a = 0.f;
      for (int64_t d = 0; d < D; ++d) a += qh[d] * kj[d];
      s[j] = a * sc;
      mx = s[j] > mx ? s[j] : mx;
    }
    float tot = 0.f;
    for (int64_t j = 0; j < n; ++j) tot += (s[j] = std::exp(s[j] - mx));
    float* oh = op + h * D;
    for (int64_t d = 0; d < D; ++d) oh[d] = 0.f;
    for (int64_t j = 0; j < n; ++j) {
      const float p = s[j] / tot;
      const float* vj = vp + (g * L + j) * D;
      for (int64_t d = 0; d < D; ++d) oh[d] += p * vj[d];
    }
  }
  return o;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rmsnorm", &rmsnorm, "RMS norm of float32 rows");
  m.def("add_rmsnorm_", &add_rmsnorm_, "x += r in place, then RMS norm of x");
  m.def("rope_cache_", &rope_cache_, "rotary embedding of q/k in place and k/v into the caches");
  m.def("attn_decode", &attn_decode, "one query row against the key/value cache, grouped heads");
}
