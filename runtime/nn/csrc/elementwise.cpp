// Small fused CPU loops of the decode step, where ATen's composite costs more than the math.
//
//   rms_norm(x [T, n], w [n]) = x * rsqrt(mean(x^2) + eps) * w      (fp32, HF's formulation)
//   rotate(x [T, H, hd], cos, sin [T, 1, hd]) = x * cos + roll(x, hd/2) * sin
//                                                 (rotary.py's three ops; sin pre-signed)
//   silu_mul(g, u [T, n]) = g / (1 + exp(-g)) * u   (the MLP's activation, fp32)
//   argmax_rows(x [B, V]) = x.argmax(-1): torch's answer (the first maximum; a NaN beats any
//                        number: the first NaN), one thread a row; torch's reduction over the
//                        last dimension runs one 16-byte lane at a time (0.42 ms at 32 x 49152)
//   convert_bf16: fp32 <-> bf16 arrays (the C++ layers' conversions around the 4-bit kernel)
//   silu_mul_bf16_rows: the same from the gate/up kernel's bf16 output [T, 2n] straight to the
//                       down kernel's bf16 input [T, n] (csrc/decode_stack.cpp), rounded as
//                       ATen's fp32 -> bf16 rounds: the same bits as silu_mul, then .to(bf16)
//
// On CPU `F.rms_norm` is a composite of five ops (pow, mean, add, rsqrt, mul x2): ~15 us a call
// at decode sizes, 60 calls a step. One pass here: ~1 us. Rotary is three ATen ops for q and
// three for k each layer. The references are runtime/nn/model.py::RMSNorm.reference_forward and
// runtime/nn/rotary.py::rotate_reference (tests/nn/test_elementwise.py).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "simd.h"

namespace quiver {

namespace {

using simd::from_bf16;
using simd::round_bf16;

inline float silu_mul1(float g, float u) { return g / (1.0f + simd::exp1(-g)) * u; }

#if defined(__AVX512F__)
inline __m512 silu_mul16(__m512 g, __m512 u) {
  const __m512 e = simd::exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
  return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u);
}
#endif

}  // namespace

// rms_norm over `rows` contiguous rows of n (the tensor form below, and the C++ decode layers'
// plain path: one compiled loop, so both give the same bits)
void rms_norm_rows(const float* xp, const float* wp, int64_t rows, int64_t n, double eps, float* op) {
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
}

at::Tensor rms_norm(const at::Tensor& x_, const at::Tensor& w_, double eps) {
  TORCH_CHECK(x_.scalar_type() == at::kFloat && w_.scalar_type() == at::kFloat, "rms_norm runs in fp32");
  const int64_t n = x_.size(-1);
  TORCH_CHECK(w_.numel() == n, "rms_norm weight has ", w_.numel(), " elements for rows of ", n);
  const at::Tensor x = x_.contiguous(), w = w_.contiguous();
  at::Tensor out = at::empty_like(x);
  rms_norm_rows(x.data_ptr<float>(), w.data_ptr<float>(), x.numel() / n, n, eps, out.data_ptr<float>());
  return out;
}

// rotate over x [T, H, hd] at strides (st, sh) (head rows contiguous) into out [T, H, hd]
// contiguous; cos / sin [T, hd] (the tensor form below, and the decode layers' plain path)
void rotate_rows(const float* xp, int64_t st, int64_t sh, const float* cp, const float* sp, int64_t T, int64_t H,
                 int64_t hd, float* op) {
  const int64_t half = hd / 2;
  at::parallel_for(0, T * H, std::max<int64_t>(1, 32768 / hd), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r / H, h = r % H;
      const float* xr = xp + t * st + h * sh;
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
}

at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos_, const at::Tensor& sin_) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && cos_.scalar_type() == at::kFloat &&
                  sin_.scalar_type() == at::kFloat && x.dim() == 3 && x.stride(2) == 1,
              "rotate: fp32 x [T, H, hd] with contiguous head rows");
  const int64_t T = x.size(0), H = x.size(1), hd = x.size(2);
  TORCH_CHECK(hd % 2 == 0 && cos_.numel() == T * hd && sin_.numel() == T * hd, "rotate: cos/sin must be [T, 1, hd]");
  const at::Tensor cos = cos_.contiguous(), sin = sin_.contiguous();
  at::Tensor out = at::empty({T, H, hd}, x.options());
  rotate_rows(x.data_ptr<float>(), x.stride(0), x.stride(1), cos.data_ptr<float>(), sin.data_ptr<float>(), T, H,
              hd, out.data_ptr<float>());
  return out;
}

// silu_mul over rows of n at row strides gs, us (contiguous out [T, n]): the tensor form below
// and the decode layers' plain path with adapters on the MLP
void silu_mul_rows(const float* gp, int64_t gs, const float* up, int64_t us, int64_t T, int64_t n, float* op) {
  at::parallel_for(0, T, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float *gr = gp + t * gs, *ur = up + t * us;
      float* o = op + t * n;
      int64_t i = 0;
#if defined(__AVX512F__)
      for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(o + i, silu_mul16(_mm512_loadu_ps(gr + i), _mm512_loadu_ps(ur + i)));
#endif
      for (; i < n; ++i) o[i] = silu_mul1(gr[i], ur[i]);
    }
  });
}

at::Tensor silu_mul(const at::Tensor& g, const at::Tensor& u) {
  TORCH_CHECK(g.scalar_type() == at::kFloat && u.scalar_type() == at::kFloat && g.dim() == 2 &&
                  u.sizes() == g.sizes() && g.stride(1) == 1 && u.stride(1) == 1,
              "silu_mul: fp32 g, u [T, n] of one shape, rows contiguous");
  const int64_t T = g.size(0), n = g.size(1);
  at::Tensor out = at::empty({T, n}, g.options());
  silu_mul_rows(g.data_ptr<float>(), g.stride(0), u.data_ptr<float>(), u.stride(0), T, n, out.data_ptr<float>());
  return out;
}

void silu_mul_bf16_rows(const at::BFloat16* gu, int64_t T, int64_t n, at::BFloat16* out) {
  // gu [T, 2n]: gate | up per row; out [T, n]
  const uint16_t* in = reinterpret_cast<const uint16_t*>(gu);
  uint16_t* o16 = reinterpret_cast<uint16_t*>(out);
  at::parallel_for(0, T, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint16_t *gr = in + t * 2 * n, *ur = gr + n;
      uint16_t* o = o16 + t * n;
      int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
      for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i),
                            simd::round_bf16_16(silu_mul16(simd::from_bf16_16(gr + i), simd::from_bf16_16(ur + i))));
#endif
      for (; i < n; ++i) o[i] = round_bf16(silu_mul1(from_bf16(gr[i]), from_bf16(ur[i])));
    }
  });
}

namespace {

// the first index of row x [n] holding its maximum (of a NaN, if any)
int64_t argmax_row(const float* x, int64_t n) {
  float mx = -INFINITY;
  bool nan = false;
  int64_t i = 0;
#if defined(__AVX512F__)
  if (n >= 16) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    __mmask16 un = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512 v = _mm512_loadu_ps(x + i);
      un |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      m = _mm512_max_ps(m, v);
    }
    mx = _mm512_reduce_max_ps(m);
    nan = un != 0;
  }
#endif
  for (; i < n; ++i) {
    nan |= std::isnan(x[i]);
    mx = std::max(mx, x[i]);
  }
  for (int64_t j = 0; j < n; ++j)  // the second pass reads the row from cache
    if (nan ? std::isnan(x[j]) : x[j] == mx) return j;
  return 0;  // n == 0 is refused by the caller
}

}  // namespace

// fp32 <-> bf16 over n elements on this thread (the C++ layers split the work): round_bf16,
// c10::BFloat16's rounding, and the exact widening
void convert_bf16(const float* src, at::BFloat16* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i), simd::round_bf16_16(_mm512_loadu_ps(src + i)));
#endif
  for (; i < n; ++i) d[i] = round_bf16(src[i]);
}

void convert_bf16(const at::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, simd::from_bf16_16(s + i));
#endif
  for (; i < n; ++i) dst[i] = from_bf16(s[i]);
}

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1 && x.size(1) > 0,
              "argmax_rows: fp32 x [B, V], V > 0, rows contiguous");
  const int64_t B = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({B}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, B, std::max<int64_t>(1, 65536 / V), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) op[b] = argmax_row(xp + b * x.stride(0), V);
  });
  return out;
}

at::Tensor silu_mul_bf16(const at::Tensor& gu) {  // silu_mul_bf16_rows as a tensor op (tests)
  TORCH_CHECK(gu.scalar_type() == at::kBFloat16 && gu.dim() == 2 && gu.is_contiguous() && gu.size(1) % 2 == 0,
              "silu_mul_bf16: contiguous bf16 gu [T, 2n]");
  at::Tensor out = at::empty({gu.size(0), gu.size(1) / 2}, gu.options());
  silu_mul_bf16_rows(gu.data_ptr<at::BFloat16>(), gu.size(0), gu.size(1) / 2, out.data_ptr<at::BFloat16>());
  return out;
}

}  // namespace quiver
