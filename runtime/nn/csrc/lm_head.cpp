// The lm_head's exact pass over approximate logits, in one read of them (runtime/nn/lm_head.py):
//
//   approx [n, V] bf16 (the int8 / bf16 matmul's output), x [n, h] fp32, W [V, h] fp32
//   out [n, V] fp32 = approx, except each row's k largest entries, which become x[i] . W[j]
//
// In torch this is four passes over [n, V] and a gather of k weight rows per row
// (to(float), topk, W[top] @ x, scatter): at 64 rows of SmolLM2's 49152-token vocabulary ~5% of
// a decode step, most of it memory traffic. Here each row is converted and scanned once: the
// running k-th largest value is a threshold that 16 lanes are compared against at a time, and
// only lanes above it touch the small heap, so the scan costs about the conversion. The k exact
// dot products then read their weight rows in place.
//
// The reference is LmHead.refine_reference (torch.topk + bmm); tests/nn/test_lm_head.py holds
// this to it. Ties at the k-th value keep the lowest ids (torch.topk may pick others: both are
// a valid top k, and the entries left out keep their approximate logit either way).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "simd.h"  // (immintrin.h with it on AVX-512)
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace quiver {

namespace {

using Entry = std::pair<float, int64_t>;  // (value, id); the heap's top is its smallest value

// A min-heap order on values: the heap's front is its smallest entry.
inline bool larger(const Entry& a, const Entry& b) { return a.first > b.first; }

// Offer (v, id) to a heap of at most k entries; returns the new threshold: the heap's smallest
// value once it holds k, else -inf (everything is taken).
inline float offer(std::vector<Entry>& heap, int64_t k, float v, int64_t id) {
  if (static_cast<int64_t>(heap.size()) < k) {
    heap.emplace_back(v, id);
    std::push_heap(heap.begin(), heap.end(), larger);
  } else if (v > heap.front().first) {
    std::pop_heap(heap.begin(), heap.end(), larger);
    heap.back() = Entry(v, id);
    std::push_heap(heap.begin(), heap.end(), larger);
  }
  return static_cast<int64_t>(heap.size()) < k ? -std::numeric_limits<float>::infinity() : heap.front().first;
}

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t d = 0;
  float sum = 0.0f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; d + 16 <= n; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

// One row: out = float(approx), keeping the k largest (value, id) in `heap`.
void convert_and_select(const at::BFloat16* src, float* dst, int64_t V, int64_t k, std::vector<Entry>& heap) {
  heap.clear();
  float thresh = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  for (; i + 16 <= V; i += 16) {
    const __m512 v = simd::from_bf16_16(src + i);
    _mm512_storeu_ps(dst + i, v);
    __mmask16 above = _mm512_cmp_ps_mask(v, _mm512_set1_ps(thresh), _CMP_GT_OQ);
    while (above) {  // rare once the heap is full: a lane above the k-th largest so far
      const int j = __builtin_ctz(above);
      above &= above - 1;
      if (dst[i + j] > thresh) thresh = offer(heap, k, dst[i + j], i + j);
    }
  }
#endif
  for (; i < V; ++i) {
    dst[i] = static_cast<float>(src[i]);
    if (dst[i] > thresh) thresh = offer(heap, k, dst[i], i);
  }
}

#if defined(__AVX2__) && defined(__FMA__)
inline float reduce8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
#endif

// out[r] = w (int8, h) . x[r] (fp32, h) for r < n <= kInt8RowsMax, fp32 sums: each chunk of
// w widened once for all the rows
constexpr int64_t kInt8RowsMax = 8;  // lm_head.py INT8_MAX_ROWS
template <int N>  // N rows, a compile-time count: the accumulators stay in registers
inline void dots_int8(const int8_t* w, const float* x, int64_t h, float* out) {
  int64_t d = 0;
  for (int r = 0; r < N; ++r) out[r] = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc[N];
  for (int r = 0; r < N; ++r) acc[r] = _mm256_setzero_ps();
  for (; d + 8 <= h; d += 8) {
    const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + d))));
    for (int r = 0; r < N; ++r) acc[r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * h + d), acc[r]);
  }
  for (int r = 0; r < N; ++r) out[r] = reduce8(acc[r]);
#endif
  for (; d < h; ++d)
    for (int r = 0; r < N; ++r) out[r] += static_cast<float>(w[d]) * x[r * h + d];
}

template <int N>
void int8_logits(const float* x, const int8_t* w, const at::BFloat16* scale, int64_t V, int64_t h, uint16_t* out) {
  at::parallel_for(0, V, 256, [&](int64_t begin, int64_t end) {
    float dots[N];
    for (int64_t v = begin; v < end; ++v) {
      dots_int8<N>(w + v * h, x, h, dots);
      const float s = static_cast<float>(scale[v]);
      for (int r = 0; r < N; ++r) out[r * V + v] = simd::round_bf16(s * dots[r]);
    }
  });
}

}  // namespace

// The int8 weight-only matmul of the approximate head on CPUs where torch's int8pack kernel is
// slow (AVX2, no AVX512: measured 23 ms against 15 ms for the fp32 matmul at one row of
// SmolLM2's 49152 x 576 head): out [n, V] bf16 = round(scale[v] * (W8[v] . x[i])), fp32 sums,
// n <= kInt8RowsMax, the weight's rows split over the threads and each read and widened once
// for all n rows. A quarter of the
// fp32 head's bytes; the exact pass (lm_head_refine) follows, as after torch's kernel.
at::Tensor lm_head_int8(const at::Tensor& x_, const at::Tensor& W8, const at::Tensor& scale) {
  TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kFloat, "x must be [n, h] fp32");
  TORCH_CHECK(W8.dim() == 2 && W8.scalar_type() == at::kChar && W8.is_contiguous() && W8.size(1) == x_.size(1),
              "W8 must be a contiguous [V, h] int8 weight");
  TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.is_contiguous() && scale.numel() == W8.size(0),
              "scale must be [V] bf16");
  const at::Tensor x = x_.contiguous();
  const int64_t n = x.size(0), V = W8.size(0), h = x.size(1);
  TORCH_CHECK(n <= kInt8RowsMax, "lm_head_int8 takes at most ", kInt8RowsMax, " rows");
  at::Tensor out = at::empty({n, V}, x.options().dtype(at::kBFloat16));
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = W8.data_ptr<int8_t>();
  const at::BFloat16* sp = scale.data_ptr<at::BFloat16>();
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  switch (n) {
    case 0: break;
    case 1: int8_logits<1>(xp, wp, sp, V, h, op); break;
    case 2: int8_logits<2>(xp, wp, sp, V, h, op); break;
    case 3: int8_logits<3>(xp, wp, sp, V, h, op); break;
    case 4: int8_logits<4>(xp, wp, sp, V, h, op); break;
    case 5: int8_logits<5>(xp, wp, sp, V, h, op); break;
    case 6: int8_logits<6>(xp, wp, sp, V, h, op); break;
    case 7: int8_logits<7>(xp, wp, sp, V, h, op); break;
    default: int8_logits<8>(xp, wp, sp, V, h, op); break;
  }
  return out;
}

at::Tensor lm_head_refine(const at::Tensor& approx_, const at::Tensor& x_, const at::Tensor& W, int64_t k) {
  TORCH_CHECK(approx_.dim() == 2 && approx_.scalar_type() == at::kBFloat16, "approx logits must be [n, V] bf16");
  TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kFloat && x_.size(0) == approx_.size(0), "x must be [n, h] fp32");
  TORCH_CHECK(W.dim() == 2 && W.scalar_type() == at::kFloat && W.is_contiguous() && W.size(0) == approx_.size(1) &&
                  W.size(1) == x_.size(1),
              "W must be a contiguous [V, h] fp32 weight");
  const at::Tensor approx = approx_.contiguous(), x = x_.contiguous();
  const int64_t n = approx.size(0), V = approx.size(1), h = x.size(1);
  TORCH_CHECK(k >= 1, "k must be at least 1");
  k = std::min(k, V);
  at::Tensor out = at::empty({n, V}, x.options());
  const at::BFloat16* ap = approx.data_ptr<at::BFloat16>();
  const float* xp = x.data_ptr<float>();
  const float* wp = W.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<Entry> heap;
    heap.reserve(k + 1);
    for (int64_t r = begin; r < end; ++r) {
      float* row = op + r * V;
      convert_and_select(ap + r * V, row, V, k, heap);
      for (const Entry& e : heap) row[e.second] = dot(wp + e.second * h, xp + r * h, h);
    }
  });
  return out;
}

}  // namespace quiver
