// LoRA on a few rows, as plain loops: out[t] = y[t] + scale * Bt^T (A x[t]) (+ bias)
//
//   x [n, in], y / out [n, out] (row-major rows, any row stride), A [r, in], Bt [r, out] (rows
//   contiguous: a slot's views in runtime/nn/lora.py), bias [out] (pre-scaled, as stored)
//
// A decode step with one adapter runs 7 projections x layers of these at n = 1..8; as two ATen
// matmuls each costs ~10 us of dispatch for ~50k multiply-adds. Here: one pass, no allocation
// but the output. The reference is lora.py::lora_delta_reference (tests/nn/test_lora_rows.py).
#include <torch/extension.h>

#include <vector>

namespace quiver {

namespace {

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kFloat && t.stride(1) == 1, name,
              " must be 2-D fp32 with contiguous rows");
}

}  // namespace

void lora_rows_into(at::Tensor& out, const at::Tensor& y, const at::Tensor& x, const at::Tensor& A,
                    const at::Tensor& Bt, double scale, const std::optional<at::Tensor>& bias) {
  check_rows(out, "out"), check_rows(y, "y"), check_rows(x, "x"), check_rows(A, "A"), check_rows(Bt, "Bt");
  const int64_t n = x.size(0), in = x.size(1), r = A.size(0), on = Bt.size(1);
  TORCH_CHECK(A.size(1) == in && Bt.size(0) == r && y.size(0) == n && y.size(1) == on &&
                  out.size(0) == n && out.size(1) == on,
              "LoRA rows: shapes disagree");
  const float* bp = nullptr;
  if (bias) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == on && bias->scalar_type() == at::kFloat,
                "LoRA bias must be [out] fp32");
    bp = bias->data_ptr<float>();
  }
  const float s = static_cast<float>(scale);
  std::vector<float> xa(r);
  for (int64_t t = 0; t < n; ++t) {
    const float* xt = x.data_ptr<float>() + t * x.stride(0);
    for (int64_t j = 0; j < r; ++j) {  // xa = A x[t]
      const float* aj = A.data_ptr<float>() + j * A.stride(0);
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < in; ++i) dot += aj[i] * xt[i];
      xa[j] = dot;
    }
    const float* yt = y.data_ptr<float>() + t * y.stride(0);
    float* ot = out.data_ptr<float>() + t * out.stride(0);
    if (ot != yt) std::copy(yt, yt + on, ot);  // out may be y itself (in place)
    for (int64_t j = 0; j < r; ++j) {  // out += scale * xa Bt
      const float c = s * xa[j];
      const float* bj = Bt.data_ptr<float>() + j * Bt.stride(0);
#pragma omp simd
      for (int64_t o = 0; o < on; ++o) ot[o] += c * bj[o];
    }
    if (bp != nullptr) {
#pragma omp simd
      for (int64_t o = 0; o < on; ++o) ot[o] += bp[o];
    }
  }
}

at::Tensor lora_rows(const at::Tensor& y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& Bt,
                     double scale, const std::optional<at::Tensor>& bias) {
  at::Tensor out = at::empty({y.size(0), y.size(1)}, y.options());
  lora_rows_into(out, y, x, A, Bt, scale, bias);
  return out;
}

void lora_rows_(at::Tensor y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& Bt,
                double scale, const std::optional<at::Tensor>& bias) {
  lora_rows_into(y, y, x, A, Bt, scale, bias);
}

}  // namespace quiver
