// Scalar and 16-lane helpers the CPU kernels share (elementwise.cpp, lora_rows.cpp,
// lm_head.cpp, paged_attention.cpp): bf16 <-> fp32 and exp. One definition each, so every
// kernel rounds and exponentiates the same way; the vector and scalar forms compute the same
// operations, so a row's scalar tail gets the bits its vector body would.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace quiver {
namespace simd {

// fp32 -> bf16, round to nearest even (NaN -> 0x7fc0): c10::BFloat16's rounding
inline uint16_t round_bf16(float x) {
  if (std::isnan(x)) return 0x7fc0;
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return static_cast<uint16_t>((b + 0x7fff + ((b >> 16) & 1)) >> 16);
}

// bf16 -> fp32, exact (a 16-bit shift)
inline float from_bf16(uint16_t h) {
  const uint32_t b = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}

// exp(x), x = n ln2 + r with |r| <= ln2 / 2: exp(r) by its degree-6 Taylor polynomial
// (relative error < 2e-7), times 2^n through the exponent bits; exp(x) = 0 below -87.33 and
// inf above 88.72.
constexpr float kExpLo = -87.33f, kExpHi = 88.72f, kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.428606765330187e-06f;  // ln2, split in two
constexpr float kExpC[] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};

inline float exp1(float x) {
  if (x < kExpLo) return 0.0f;
  if (x > kExpHi) return INFINITY;
  const float n = std::nearbyint(x * kLog2e);
  float r = std::fma(-n, kLn2Hi, x);
  r = std::fma(-n, kLn2Lo, r);
  float p = kExpC[0];
  for (int i = 1; i < 7; ++i) p = std::fma(p, r, kExpC[i]);
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

#if defined(__AVX512F__)
inline __m512 exp16(__m512 x) {  // exp1 on 16 lanes
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpLo), _CMP_LT_OQ);
  const __mmask16 huge = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpHi), _CMP_GT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(kExpLo)), _mm512_set1_ps(kExpHi));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpC[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC[i]));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  const __m512 e = _mm512_maskz_mul_ps(static_cast<__mmask16>(~tiny), p, _mm512_castsi512_ps(bits));
  return _mm512_mask_mov_ps(e, huge, _mm512_set1_ps(INFINITY));
}

inline __m256i round_bf16_16(__m512 x) {  // round_bf16 on 16 lanes
  const __m512i b = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

inline __m512 widen_bf16_16(__m256i h) {  // from_bf16 on 16 lanes
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __m512 from_bf16_16(const void* p) {  // 16 bf16 from memory
  return widen_bf16_16(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
}

#if defined(__AVX512BW__) && defined(__AVX512VL__)
inline __m512 from_bf16_16(const void* p, __mmask16 m) {  // the lanes of m; 0 elsewhere
  return widen_bf16_16(_mm256_maskz_loadu_epi16(m, p));
}
#endif
#endif

}  // namespace simd
}  // namespace quiver
