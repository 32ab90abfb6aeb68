// Small fused CPU loops of the decode step, where ATen's composite costs more than the math.
//
//   rms_norm(x [T, n], w [n]) = x * rsqrt(mean(x^2) + eps) * w      (fp32, HF's formulation)
//
// On CPU `F.rms_norm` is a composite of five ops (pow, mean, add, rsqrt, mul x2): ~15 us a call
// at decode sizes, 60 calls a step. One pass here: ~1 us. The reference is
// runtime/nn/model.py::RMSNorm.reference_forward (tests/nn/test_elementwise.py).
#include <torch/extension.h>

#include <ATen/Parallel.h>

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

}  // namespace quiver
