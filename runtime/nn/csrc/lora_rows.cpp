// LoRA on a few rows, as plain loops: out[t] = y[t] + scale * Bt^T (A x[t]) (+ bias)
//
//   x [n, in], y / out [n, out] (row-major rows, any row stride), A [r, in], Bt [r, out] (rows
//   contiguous: a slot's views in runtime/nn/lora.py), bias [out] (pre-scaled, as stored)
//
// A decode step with one adapter runs 7 projections x layers of these at n = 1..8; as two ATen
// matmuls each costs ~10 us of dispatch for ~50k multiply-adds. Here: one pass, no allocation
// but the output. The reference is lora.py::lora_delta_reference (tests/nn/test_lora_rows.py).
//
// lora_runs_ does the same for every short run of a step at once, in place, split over threads:
//
//   y [T, out], x [T, in], A [S+1, R, in], Bt [S+1, R, out], bias [S+1, out] (LoraSlots' slot
//   tensors), meta [S+1, 3] float64 (slot_meta: rank, scale, has_bias), runs [n, 3] int64
//   (slot, start, end), each end - start <= kRunRowsMax; slots of rank 0 add nothing
//
// A decode step over many adapters (one row each) is a stream of distinct weights: 64 rank-16
// adapters on all seven projections read ~40 MB a layer, 2 flops a byte, so the step is
// bound by memory bandwidth. One pass over each slot's A and Bt rows (each row read once for
// all of the run's tokens), the runs split over the cores, is that stream and nothing else;
// two ATen bmm over the slot range (the "slab" path this pass replaced) reached about half of it.
// Slot weights (A, Bt) are fp32 or bf16 (`--adapter-dtype`); x, y, bias and the math are fp32.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "simd.h"

namespace quiver {

namespace {

constexpr int64_t kRunRowsMax = 8;  // lora.py: LORA_ROWS_MAX
// below this many bytes of adapter weights a step's runs go on one thread (a parallel region
// costs a few microseconds; a rank-16 q_proj slot is 74 kB)
constexpr int64_t kParallelBytes = 1 << 18;

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kFloat && t.stride(1) == 1, name,
              " must be 2-D fp32 with contiguous rows");
}

// The slot weights' element type W: float, or bf16 (`--adapter-dtype bfloat16`: half the bytes
// of a memory-bound stream). bf16 widens to fp32 exactly (a 16-bit shift), so every product and
// sum below is the fp32 one whatever W is: bf16 slots holding bf16-representable values give
// the bits fp32 slots holding the same values give (tests/nn/test_lora_rows.py).
inline float widen(float w) { return w; }
inline float widen(at::BFloat16 w) { return static_cast<float>(w); }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define QUIVER_LORA_AVX512 1
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) { return simd::from_bf16_16(p); }
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const at::BFloat16* p, __mmask16 m) { return simd::from_bf16_16(p, m); }
#elif defined(__AVX2__) && defined(__FMA__)
#define QUIVER_LORA_AVX2 1
#include <immintrin.h>
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {  // widen: a 16-bit shift, exact
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float reduce8(__m256 v) {  // lanes summed in a fixed order
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
#endif

// a . b over n elements (a: slot weights, b: fp32 activations). Four accumulators: one chain
// of fused multiply-adds is latency-bound (4 cycles each) below what a core streams from memory.
// Every path sums in an order that depends on n alone, never on W, so bf16 slots give the fp32
// slots' bits (the plain loop is not vectorized for that reason: `omp simd` reassociated the
// fp32 sum and not the bf16 one).
constexpr int64_t kPrefetchBytes = 4096;
template <typename W>
inline float dot(const W* a, const float* b, int64_t n) {
#if defined(QUIVER_LORA_AVX512)
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    const char* ahead = reinterpret_cast<const char*>(a + i) + kPrefetchBytes;
    for (size_t line = 0; line < 64 * sizeof(W); line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
    s0 = _mm512_fmadd_ps(load16(a + i), _mm512_loadu_ps(b + i), s0);
    s1 = _mm512_fmadd_ps(load16(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    s2 = _mm512_fmadd_ps(load16(a + i + 32), _mm512_loadu_ps(b + i + 32), s2);
    s3 = _mm512_fmadd_ps(load16(a + i + 48), _mm512_loadu_ps(b + i + 48), s3);
  }
  for (; i + 16 <= n; i += 16) s0 = _mm512_fmadd_ps(load16(a + i), _mm512_loadu_ps(b + i), s0);
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    s1 = _mm512_fmadd_ps(load16(a + i, m), _mm512_maskz_loadu_ps(m, b + i), s1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
#elif defined(QUIVER_LORA_AVX2)
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm256_fmadd_ps(load8(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(load8(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    s2 = _mm256_fmadd_ps(load8(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
    s3 = _mm256_fmadd_ps(load8(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(load8(a + i), _mm256_loadu_ps(b + i), s0);
  float s = reduce8(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  for (; i < n; ++i) s = std::fma(widen(a[i]), b[i], s);
  return s;
#else
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s = std::fma(widen(a[i]), b[i], s);
  return s;
#endif
}

// o[k] += c * w[k] for k < n, as fused multiply-adds
template <typename W>
inline void axpy(float* o, float c, const W* w, int64_t n) {
#if defined(QUIVER_LORA_AVX512)
  const __m512 cv = _mm512_set1_ps(c);
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) _mm512_storeu_ps(o + k, _mm512_fmadd_ps(cv, load16(w + k), _mm512_loadu_ps(o + k)));
  if (k < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - k)) - 1);
    _mm512_mask_storeu_ps(o + k, m, _mm512_fmadd_ps(cv, load16(w + k, m), _mm512_maskz_loadu_ps(m, o + k)));
  }
#else
  for (int64_t k = 0; k < n; ++k) o[k] = std::fma(c, widen(w[k]), o[k]);
#endif
}

// out[t] = y[t] + sum_j c[t, j] Bt[j] for t < n, the sum in j order. Row by row of Bt: each
// row streams from memory once for all n rows (the out rows stay in L1). Keeping 16 columns'
// sums in registers over all of Bt's rows instead measured slower: r strided streams.
template <typename W>
void expand(float* out, int64_t out_stride, const float* y, int64_t y_stride, int64_t n, const float* c,
            int64_t r, const W* Bt, int64_t b_stride, int64_t on) {
  for (int64_t t = 0; t < n; ++t) {  // out may be y itself (in place)
    float* ot = out + t * out_stride;
    const float* yt = y + t * y_stride;
    if (ot != yt) std::copy(yt, yt + on, ot);
  }
  for (int64_t j = 0; j < r; ++j) {
    const W* bj = Bt + j * b_stride;
    for (int64_t t = 0; t < n; ++t) axpy(out + t * out_stride, c[t * r + j], bj, on);
  }
}

// One run of n <= kRunRowsMax rows: out[t] = y[t] + sum_j (s * A[j] . x[t]) Bt[j] (+ bias).
// Each A and Bt row is read from memory once for all n rows; xa [n * r] is scratch.
template <typename W>
void run_rows(float* out, int64_t out_stride, const float* y, int64_t y_stride, const float* x,
              int64_t x_stride, int64_t n, int64_t in, const W* A, int64_t a_stride, int64_t r,
              const W* Bt, int64_t b_stride, int64_t on, float s, const float* bias, float* xa) {
  for (int64_t j = 0; j < r; ++j)  // xa[t, j] = s * (A x[t])_j
    for (int64_t t = 0; t < n; ++t) xa[t * r + j] = s * dot(A + j * a_stride, x + t * x_stride, in);
  expand(out, out_stride, y, y_stride, n, xa, r, Bt, b_stride, on);
  if (bias != nullptr) {
    for (int64_t t = 0; t < n; ++t) {
      float* ot = out + t * out_stride;
#pragma omp simd
      for (int64_t o = 0; o < on; ++o) ot[o] += bias[o];
    }
  }
}

// f(A's data, Bt's data) as float* or at::BFloat16*: A and Bt share one weight dtype, fp32 or bf16
template <typename F>
void with_weights(const at::Tensor& A, const at::Tensor& Bt, F&& f) {
  TORCH_CHECK(A.scalar_type() == Bt.scalar_type() &&
                  (A.scalar_type() == at::kFloat || A.scalar_type() == at::kBFloat16),
              "LoRA: A and Bt must both be fp32 or both bf16");
  if (A.scalar_type() == at::kFloat) f(A.data_ptr<float>(), Bt.data_ptr<float>());
  else f(A.data_ptr<at::BFloat16>(), Bt.data_ptr<at::BFloat16>());
}

}  // namespace

void lora_rows_into(at::Tensor& out, const at::Tensor& y, const at::Tensor& x, const at::Tensor& A,
                    const at::Tensor& Bt, double scale, const std::optional<at::Tensor>& bias) {
  check_rows(out, "out"), check_rows(y, "y"), check_rows(x, "x");
  TORCH_CHECK(A.dim() == 2 && Bt.dim() == 2 && A.stride(1) == 1 && Bt.stride(1) == 1,
              "LoRA rows: A and Bt must be 2-D with contiguous rows");
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
  std::vector<float> xa(kRunRowsMax * r);
  with_weights(A, Bt, [&](auto* Ap, auto* Bp) {
    for (int64_t a = 0; a < n; a += kRunRowsMax) {
      const int64_t m = std::min(kRunRowsMax, n - a);
      run_rows(out.data_ptr<float>() + a * out.stride(0), out.stride(0), y.data_ptr<float>() + a * y.stride(0),
               y.stride(0), x.data_ptr<float>() + a * x.stride(0), x.stride(0), m, in, Ap, A.stride(0), r, Bp,
               Bt.stride(0), on, static_cast<float>(scale), bp, xa.data());
    }
  });
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

void lora_runs_into(at::Tensor& y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& Bt,
                    const at::Tensor& bias, const at::Tensor& meta, const int64_t* runs, int64_t num_runs) {
  check_rows(y, "y"), check_rows(x, "x");
  TORCH_CHECK(A.dim() == 3 && Bt.dim() == 3 && A.is_contiguous() && Bt.is_contiguous(),
              "LoRA runs: A [S+1, R, in] and Bt [S+1, R, out] must be contiguous");
  const int64_t slots = A.size(0), R = A.size(1), in = A.size(2), on = Bt.size(2), T = x.size(0);
  TORCH_CHECK(Bt.size(0) == slots && Bt.size(1) == R && x.size(1) == in && y.size(0) == T && y.size(1) == on,
              "LoRA runs: shapes disagree");
  TORCH_CHECK(bias.is_contiguous() && bias.scalar_type() == at::kFloat && bias.size(0) == slots &&
                  bias.size(1) == on, "LoRA runs: bias must be [S+1, out] fp32");
  TORCH_CHECK(meta.is_contiguous() && meta.scalar_type() == at::kDouble && meta.size(0) == slots,
              "LoRA runs: meta must be [S+1, 3] float64");
  const double* mp = meta.data_ptr<double>();
  int64_t bytes = 0;
  for (int64_t i = 0; i < num_runs; ++i) {
    const int64_t slot = runs[3 * i], a = runs[3 * i + 1], b = runs[3 * i + 2];
    TORCH_CHECK(0 <= slot && slot < slots && 0 <= a && a <= b && b <= T && b - a <= kRunRowsMax,
                "LoRA runs: run ", i, " (", slot, ", ", a, ", ", b, ") is outside the batch or longer than ",
                kRunRowsMax, " rows");
    const int64_t r = static_cast<int64_t>(mp[3 * slot]);
    TORCH_CHECK(0 <= r && r <= R, "LoRA runs: slot ", slot, " has rank ", r, " > ", R);
    bytes += r * (in + on) * static_cast<int64_t>(A.element_size());
  }
  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* biasp = bias.data_ptr<float>();
  const int64_t ys = y.stride(0), xs = x.stride(0);
  with_weights(A, Bt, [&](auto* Ap, auto* Bp) {
    at::parallel_for(0, num_runs, bytes < kParallelBytes ? num_runs : 1, [&](int64_t begin, int64_t end) {
      std::vector<float> xa(kRunRowsMax * R);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t slot = runs[3 * i], a = runs[3 * i + 1], b = runs[3 * i + 2];
        const int64_t r = static_cast<int64_t>(mp[3 * slot]);
        if (r == 0 || a == b) continue;
        const float* bp = mp[3 * slot + 2] != 0.0 ? biasp + slot * on : nullptr;
        run_rows(yp + a * ys, ys, yp + a * ys, ys, xp + a * xs, xs, b - a, in, Ap + slot * R * in, in, r,
                 Bp + slot * R * on, on, on, static_cast<float>(mp[3 * slot + 1]), bp, xa.data());
      }
    });
  });
}

void lora_runs_(at::Tensor y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& Bt,
                const at::Tensor& bias, const at::Tensor& meta, const at::Tensor& runs) {
  TORCH_CHECK(runs.dim() == 2 && runs.size(1) == 3 && runs.scalar_type() == at::kLong && runs.is_contiguous(),
              "LoRA runs: runs must be [n, 3] int64 (slot, start, end)");
  lora_runs_into(y, x, A, Bt, bias, meta, runs.data_ptr<int64_t>(), runs.size(0));
}

}  // namespace quiver
