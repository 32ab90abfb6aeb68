// A 4-bit projection on a few rows, over bitsandbytes' standard layout, in fp32:
//
//   out [M, N] = x [M, K] @ dequant(codes, absmax).T        M <= kGemvRowsMax (decode steps)
//
//   codes   [N*K/2] uint8, row-major, two codes a byte: element 2i in the high nibble, 2i+1 in
//           the low one (bitsandbytes' quantize_4bit)
//   absmax  [N*K/blocksize] fp32, one per block of `blocksize` consecutive elements (the nested
//           statistics dequantized once, at load: runtime/nn/quant.py)
//   lut     [16] fp32, the code's values (NF4 or FP4)
//
// Why: on CPUs without AVX512-BF16 bitsandbytes has no fused kernel, and its path dequantizes
// the whole weight to fp32 for every call and then multiplies: at decode rows that was most of
// a step (measured, SmolLM2-135M, 2 AVX2 cores: ~150 ms of a ~190 ms step). Here each
// code is read once and turned into its value in registers; every weight is lut[c] (the value
// bitsandbytes' dequantization gives before its absmax product), each block's sum is scaled by
// its absmax once, so the result is the dequantized matmul up to fp32 summation order. The
// pure-torch reference is QuantLinear.reference_forward (tests/nn/test_nf4_gemv.py).
//
// Layout of the work: the output rows are split over the threads (each reads its rows' codes
// once for all M input rows); x is split into its even and odd elements first, so a byte's two
// codes meet their inputs without a shuffle.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace quiver {

namespace {

constexpr int64_t kGemvRowsMax = 8;  // quant.py: GEMV_MAX_ROWS
constexpr int64_t kGrainRows = 16;   // output rows per parallel chunk at least

#if defined(__AVX2__) && defined(__FMA__)
// 8 codes (int32 lanes, 0..15) -> their values: two 8-entry permutes, bit 3 picks the half
inline __m256 lookup8(__m256i c, __m256 lo, __m256 hi) {
  const __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(c, 28));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, c), _mm256_permutevar8x32_ps(hi, c), sel);
}

inline float reduce8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
#endif

// out[t, o] for o in [o0, o1), t < M: xe / xo [M, K/2] the even / odd elements of x's rows
void gemv_rows(const uint8_t* codes, const float* absmax, const float* lut, const float* xe,
               const float* xo, int64_t M, int64_t K, int64_t bs, float* out, int64_t N, int64_t o0,
               int64_t o1) {
  const int64_t half = K / 2, bytes_per_block = bs / 2, blocks = K / bs;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 lo = _mm256_loadu_ps(lut), hi = _mm256_loadu_ps(lut + 8);
  const __m256i low4 = _mm256_set1_epi32(0x0f);
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = codes + o * half;
    const float* am = absmax + o * blocks;
    __m256 acc[kGemvRowsMax];
    for (int64_t t = 0; t < M; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      __m256 bsum[kGemvRowsMax];
      for (int64_t t = 0; t < M; ++t) bsum[t] = _mm256_setzero_ps();
      for (int64_t j = b * bytes_per_block; j < (b + 1) * bytes_per_block; j += 8) {  // 16 codes
        const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + j)));
        const __m256 we = lookup8(_mm256_srli_epi32(c, 4), lo, hi);  // elements 2j, 2j+2, ...
        const __m256 wo = lookup8(_mm256_and_si256(c, low4), lo, hi);  // 2j+1, 2j+3, ...
        for (int64_t t = 0; t < M; ++t) {
          bsum[t] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xe + t * half + j), bsum[t]);
          bsum[t] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xo + t * half + j), bsum[t]);
        }
      }
      const __m256 scale = _mm256_set1_ps(am[b]);
      for (int64_t t = 0; t < M; ++t) acc[t] = _mm256_fmadd_ps(bsum[t], scale, acc[t]);
    }
    for (int64_t t = 0; t < M; ++t) out[t * N + o] = reduce8(acc[t]);
  }
#else
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* row = codes + o * half;
    for (int64_t t = 0; t < M; ++t) {
      float acc = 0.0f;
      for (int64_t b = 0; b < blocks; ++b) {
        float s = 0.0f;
        for (int64_t j = b * bytes_per_block; j < (b + 1) * bytes_per_block; ++j) {
          s = std::fma(lut[row[j] >> 4], xe[t * half + j], s);
          s = std::fma(lut[row[j] & 0x0f], xo[t * half + j], s);
        }
        acc = std::fma(s, absmax[o * blocks + b], acc);
      }
      out[t * N + o] = acc;
    }
  }
#endif
}

}  // namespace

// x [M, K] fp32 (any leading stride, rows contiguous), M <= kGemvRowsMax; codes, absmax, lut as
// above; K % blocksize == 0 and blocksize % 16 == 0 (runtime/nn/quant.py checks the shape once)
at::Tensor nf4_gemv(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
                    const at::Tensor& lut, int64_t n, int64_t blocksize) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1, "x must be 2-D fp32 rows");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M <= kGemvRowsMax, "nf4_gemv takes at most ", kGemvRowsMax, " rows");
  TORCH_CHECK(blocksize % 16 == 0 && K % blocksize == 0, "shape not taken: K ", K, ", blocksize ", blocksize);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.numel() == n * K / 2, "codes");
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous() && absmax.numel() == n * K / blocksize,
              "absmax");
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.is_contiguous() && lut.numel() == 16, "lut");
  at::Tensor out = at::empty({M, n}, x.options());
  if (M == 0) return out;
  const int64_t half = K / 2;
  std::vector<float> split(2 * M * half);  // [xe rows | xo rows]
  float* xe = split.data();
  float* xo = split.data() + M * half;
  const float* xp = x.data_ptr<float>();
  for (int64_t t = 0; t < M; ++t) {
    const float* r = xp + t * x.stride(0);
    for (int64_t j = 0; j < half; ++j) {
      xe[t * half + j] = r[2 * j];
      xo[t * half + j] = r[2 * j + 1];
    }
  }
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const float* am = absmax.data_ptr<float>();
  const float* lt = lut.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, kGrainRows, [&](int64_t o0, int64_t o1) {
    gemv_rows(c, am, lt, xe, xo, M, K, blocksize, op, n, o0, o1);
  });
  return out;
}

}  // namespace quiver
