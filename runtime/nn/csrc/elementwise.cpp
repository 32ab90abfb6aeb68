// Small fused CPU loops of the decode step, where ATen's composite costs more than the math.
//
//   rms_norm(x [T, n], w [n]) = x * rsqrt(mean(x^2) + eps) * w      (fp32, HF's formulation)
//   rotate(x [T, H, hd], cos, sin [T, 1, hd]) = x * cos + roll(x, hd/2) * sin
//                                                 (rotary.py's three ops; sin pre-signed)
//
// On CPU `F.rms_norm` is a composite of five ops (pow, mean, add, rsqrt, mul x2): ~15 us a call
// at decode sizes, 60 calls a step. One pass here: ~1 us. Rotary is three ATen ops for q and
// three for k each layer. The references are runtime/nn/model.py::RMSNorm.reference_forward and
// runtime/nn/rotary.py::rotate_reference (tests/nn/test_elementwise.py).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace quiver {

at::Tensor rms_norm(const at::Tensor& x_, const at::Tensor& w_, double eps) {
  TORCH_CHECK(x_.scalar_type() == at::kFloat && w_.scalar_type() == at::kFloat, "rms_norm runs in fp32");
  const int64_t n = x_.size(-1);
  TORCH_CHECK(w_.numel() == n, "rms_norm weight has ", w_.numel(), " elements for rows of ", n);
  const at::Tensor x = x_.contiguous(), w = w_.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t rows = x.numel() / n;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xp + r * n;
      float* orow = op + r * n;
      float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < n; ++i) ss += xr[i] * xr[i];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + feps);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) orow[i] = wp[i] * (xr[i] * inv);
    }
  });
  return out;
}

at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos_, const at::Tensor& sin_) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && cos_.scalar_type() == at::kFloat &&
                  sin_.scalar_type() == at::kFloat && x.dim() == 3 && x.stride(2) == 1,
              "rotate: fp32 x [T, H, hd] with contiguous head rows");
  const int64_t T = x.size(0), H = x.size(1), hd = x.size(2), half = hd / 2;
  TORCH_CHECK(hd % 2 == 0 && cos_.numel() == T * hd && sin_.numel() == T * hd, "rotate: cos/sin must be [T, 1, hd]");
  const at::Tensor cos = cos_.contiguous(), sin = sin_.contiguous();
  at::Tensor out = at::empty({T, H, hd}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T * H, std::max<int64_t>(1, 32768 / hd), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r / H, h = r % H;
      const float* xr = xp + t * x.stride(0) + h * x.stride(1);
      const float* c = cp + t * hd;
      const float* s = sp + t * hd;
      float* o = op + r * hd;
      // roll(x, half)[d] = x[d - half] for d >= half, x[d + half] below
#pragma omp simd
      for (int64_t d = 0; d < half; ++d) o[d] = xr[d] * c[d] + xr[d + half] * s[d];
#pragma omp simd
      for (int64_t d = half; d < hd; ++d) o[d] = xr[d] * c[d] + xr[d - half] * s[d];
    }
  });
  return out;
}

}  // namespace quiver
