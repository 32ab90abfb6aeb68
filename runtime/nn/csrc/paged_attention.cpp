// Decode attention straight over the paged KV cache: no gather, no padding, no mask tensor.
//
//   q [B, H, hd] (one query per row, rotated), cache pool [L, 2, blocks, bs, Hkv, hd]
//   row b sees keys lo[b] .. len[b]-1, key i at pool[layer, 0, table[b, i / bs], i % bs]
//   out[b, h] = softmax_i(q[b, h] . k_i / sqrt(hd)) @ v_i       (head h reads kv head h / (H/Hkv))
//
// The reference is runtime/nn/attention.py::attend_reference (explicit softmax per row), and
// SDPA over the gathered keys is what the Python path ran before (tests/nn/test_native.py).
// Work is split over (row, kv head) pairs; each pair's query heads share one read of the keys.
// When the pairs are too few to keep the threads busy (one long stream: 3 pairs for SmolLM2),
// each pair's keys are also split into chunks whose partial softmaxes merge by their maxima
// (flash-decoding's split-K).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "simd.h"  // (immintrin.h with it)

namespace quiver {
namespace {

constexpr int64_t kTile = 4;  // keys per step of the vector loops
constexpr int64_t kMinChunk = 128;  // fewest keys a split-off chunk of one row gets
constexpr int64_t kTasksPerThread = 4;  // split rows' keys until there are this many tasks a thread
constexpr int64_t kMinParallelWork = 1 << 16;  // multiply-adds (keys x heads x hd) worth a thread
// Key / value rows requested this many rows ahead of their use. A (row, kv head) pair's rows sit
// Hkv * hd floats apart, in blocks anywhere in the pool: runs too short and scattered for the
// hardware prefetcher, so without this each tile waits on memory (the loop is load-bound). A
// row takes a few nanoseconds against ~100 of memory latency: 8 rows ahead measured 25% slower
// than 32 (one thread, 32 rows of 32 and 256 keys, one row of 512); the values' first rows are
// requested during the keys' pass, a distance behind.
constexpr int64_t kPrefetch = 32;

// The cache lines of one key / value row (hd floats) into L1, ahead of use.
inline void prefetch(const float* p, int64_t hd) {
  for (int64_t d = 0; d < hd; d += 16) __builtin_prefetch(p + d, 0, 3);
}

#if defined(__AVX512F__)
// Four sums of 16-lane vectors -> one 4-lane vector [sum(a0), sum(a1), sum(a2), sum(a3)].
inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  auto half = [](__m512 a) {  // 16 -> 8 lanes
    return _mm256_add_ps(_mm512_castps512_ps256(a),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  };
  __m256 e = _mm256_hadd_ps(_mm256_hadd_ps(half(a0), half(a1)), _mm256_hadd_ps(half(a2), half(a3)));
  return _mm_add_ps(_mm256_castps256_ps128(e), _mm256_extractf128_ps(e, 1));
}
#endif


// s[i] = exp(s[i] - mx) for i < n; returns their sum
inline float exp_shifted(float* s, int64_t n, float mx) {
  int64_t i = 0;
  float sum = 0.0f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  const __m512 m = _mm512_set1_ps(mx);
  for (; i + 16 <= n; i += 16) {
    const __m512 e = simd::exp16(_mm512_sub_ps(_mm512_loadu_ps(s + i), m));
    _mm512_storeu_ps(s + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) sum += (s[i] = std::exp(s[i] - mx));
  return sum;
}

// s[0..3] = q . k[j] for four keys (hd % 16 == 0 on the vector path)
inline void dot4(const float* q, const float* const k[kTile], int64_t hd, float* s) {
#if defined(__AVX512F__)
  if (hd % 16 == 0) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t d = 0; d < hd; d += 16) {
      const __m512 qv = _mm512_loadu_ps(q + d);
      a0 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k[0] + d), a0);
      a1 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k[1] + d), a1);
      a2 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k[2] + d), a2);
      a3 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k[3] + d), a3);
    }
    _mm_storeu_ps(s, reduce4(a0, a1, a2, a3));
    return;
  }
#endif
  for (int64_t j = 0; j < kTile; ++j) {
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < hd; ++d) dot += q[d] * k[j][d];
    s[j] = dot;
  }
}

// a += p[0] v[0] + p[1] v[1] + p[2] v[2] + p[3] v[3] over hd lanes (one load/store of a)
inline void axpy4(float* a, const float p[kTile], const float* const v[kTile], int64_t hd) {
#pragma omp simd
  for (int64_t d = 0; d < hd; ++d) a[d] += p[0] * v[0][d] + p[1] * v[1][d] + p[2] * v[2][d] + p[3] * v[3][d];
}

}  // namespace

void paged_decode_attention_into(const float* qp, int64_t B, int64_t H, int64_t hd, const at::Tensor& pool,
                                 int64_t layer, const int64_t* tp, int64_t nb, const int64_t* lp,
                                 const int64_t* lop, float* op);

at::Tensor paged_decode_attention(const at::Tensor& q_, const at::Tensor& pool, int64_t layer,
                                  const at::Tensor& table_, const at::Tensor& lens_,
                                  const at::Tensor& los_) {
  TORCH_CHECK(q_.scalar_type() == at::kFloat && q_.dim() == 3, "paged attention runs in fp32 on q [B, H, hd]");
  const at::Tensor q = q_.contiguous();
  const at::Tensor table = table_.to(at::kLong).contiguous();
  const at::Tensor lens = lens_.to(at::kLong).contiguous(), los = los_.to(at::kLong).contiguous();
  TORCH_CHECK(table.dim() == 2 && table.size(0) == q.size(0) && lens.numel() == q.size(0) &&
                  los.numel() == q.size(0), "one block table, length and first key per row");
  at::Tensor out = at::empty_like(q);
  paged_decode_attention_into(q.data_ptr<float>(), q.size(0), q.size(1), q.size(2), pool, layer,
                              table.data_ptr<int64_t>(), table.size(1), lens.data_ptr<int64_t>(),
                              los.data_ptr<int64_t>(), out.data_ptr<float>());
  return out;
}

// The same on raw rows (csrc/decode_stack.cpp's plain decode layers): q [B, H, hd] and out
// contiguous, table [B, nb], lens and los [B] int64.
void paged_decode_attention_into(const float* qp, int64_t B, int64_t H, int64_t hd, const at::Tensor& pool,
                                 int64_t layer, const int64_t* tp, int64_t nb, const int64_t* lp,
                                 const int64_t* lop, float* op) {
  TORCH_CHECK(pool.scalar_type() == at::kFloat && pool.is_contiguous(), "the KV pool must be fp32 and contiguous");
  const int64_t blocks = pool.size(2), bs = pool.size(3), Hkv = pool.size(4);
  TORCH_CHECK(pool.size(5) == hd && H % Hkv == 0, "q and the cache disagree on heads");
  const int64_t group = H / Hkv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  for (int64_t b = 0; b < B; ++b) {  // checked here: an error inside parallel_for is a worker's
    const int64_t lo = lop[b], len = lp[b];
    TORCH_CHECK(0 <= lo && lo < len && (len + bs - 1) / bs <= nb, "row ", b,
                " sees keys ", lo, "..", len, " over ", nb, " blocks of ", bs);
    for (int64_t j = lo / bs; j < (len + bs - 1) / bs; ++j)
      TORCH_CHECK(0 <= tp[b * nb + j] && tp[b * nb + j] < blocks, "row ", b, " names block ",
                  tp[b * nb + j], " of ", blocks);
  }
  const float* kbase = pool.data_ptr<float>() + layer * 2 * blocks * bs * Hkv * hd;
  const float* vbase = kbase + blocks * bs * Hkv * hd;
  const int64_t row_stride = Hkv * hd;  // between consecutive token rows of one block

  // Keys i0..i1-1 of row b (counted from its first visible key) for kv head g: per query head
  // h, acc[h] = sum_i exp(s_i - m[h]) v_i with m[h] = max_i s_i and l[h] = sum_i exp(s_i - m[h]).
  // offs: scratch for the keys' row offsets, walked block by block (an integer division per
  // key and use, 4 a key, cost more than the key's multiply-adds).
  auto attend_keys = [&](int64_t b, int64_t g, int64_t i0, int64_t i1, float* acc, float* m,
                         float* l, std::vector<float>& scores, std::vector<int64_t>& offs) {
    const int64_t n = i1 - i0;
    const float* qg = qp + (b * H + g * group) * hd;  // this kv head's query heads
    offs.resize(n);
    for (int64_t i = 0, pos = lop[b] + i0, blk = pos / bs, at = pos % bs; i < n; ++i) {
      offs[i] = (tp[b * nb + blk] * bs + at) * row_stride + g * hd;
      if (++at == bs) at = 0, ++blk;
    }
    auto row = [&](const float* base, int64_t i) { return base + offs[i]; };  // key / value i0 + i
    scores.assign(group * n, 0.0f);
    const float* kv[kTile];
    for (int64_t i = 0; i < kPrefetch && i < n; ++i) prefetch(row(kbase, i), hd);
    for (int64_t i = 0; i < n; i += kTile) {  // scores: each key read once for the whole group
      const int64_t t = std::min(kTile, n - i);
      for (int64_t j = 0; j < kTile; ++j) kv[j] = row(kbase, i + std::min(j, t - 1));
      for (int64_t j = i + kPrefetch; j < std::min(n, i + kPrefetch + kTile); ++j) prefetch(row(kbase, j), hd);
      for (int64_t j = i; j < std::min(n, i + kTile); ++j)  // the values, a prefetch distance behind
        if (j < kPrefetch) prefetch(row(vbase, j), hd);
      float s4[kTile];
      for (int64_t h = 0; h < group; ++h) {
        dot4(qg + h * hd, kv, hd, s4);
        for (int64_t j = 0; j < t; ++j) scores[h * n + i + j] = s4[j] * scale;
      }
    }
    for (int64_t h = 0; h < group; ++h) {  // exp(s - max) per query head
      float* sh = scores.data() + h * n;
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < n; ++i) mx = std::max(mx, sh[i]);
      m[h] = mx, l[h] = exp_shifted(sh, n, mx);
    }
    std::fill(acc, acc + group * hd, 0.0f);
    for (int64_t i = 0; i < n; i += kTile) {  // acc = p @ V, each value row read once
      const int64_t t = std::min(kTile, n - i);
      for (int64_t j = 0; j < kTile; ++j) kv[j] = row(vbase, i + std::min(j, t - 1));
      for (int64_t j = i + kPrefetch; j < std::min(n, i + kPrefetch + kTile); ++j) prefetch(row(vbase, j), hd);
      for (int64_t h = 0; h < group; ++h) {
        float p4[kTile] = {0.0f, 0.0f, 0.0f, 0.0f};  // a short tile repeats its last row at p 0
        for (int64_t j = 0; j < t; ++j) p4[j] = scores[h * n + i + j];
        axpy4(acc + h * hd, p4, kv, hd);
      }
    }
  };

  // Few (row, kv head) pairs for the threads (one long stream): split each pair's keys into
  // chunks of at least kMinChunk keys, attend the chunks in parallel, merge by their maxima.
  const int64_t pairs = B * Hkv;
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) longest = std::max(longest, lp[b] - lop[b]);
  const int64_t want = (kTasksPerThread * at::get_num_threads() + pairs - 1) / pairs;
  const int64_t chunk = std::max(kMinChunk, (longest + want - 1) / want);
  const int64_t chunks = (longest + chunk - 1) / chunk;

  // Pairs per thread at least: a parallel region costs microseconds, and on a machine whose
  // cores are shared each one waits for the slowest thread, so small work stays on one.
  const int64_t work = std::max<int64_t>(1, longest * group * hd);
  const int64_t grain = std::max<int64_t>(1, kMinParallelWork / work);
  if (chunks <= 1) {
    at::parallel_for(0, pairs, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> scores, m(group), l(group);
      std::vector<int64_t> offs;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / Hkv, g = task % Hkv;
        float* o = op + (b * H + g * group) * hd;
        attend_keys(b, g, 0, lp[b] - lop[b], o, m.data(), l.data(), scores, offs);
        for (int64_t h = 0; h < group; ++h) {
          const float inv = 1.0f / l[h];
          for (int64_t d = 0; d < hd; ++d) o[h * hd + d] *= inv;
        }
      }
    });
    return;
  }
  // partial[pair, chunk]: acc [group, hd], then m [group], l [group]
  const int64_t stride = group * (hd + 2);
  std::vector<float> partial(pairs * chunks * stride);
  at::parallel_for(0, pairs * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<int64_t> offs;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t pair = task / chunks, c = task % chunks, b = pair / Hkv, g = pair % Hkv;
      float* p = partial.data() + task * stride;
      const int64_t i0 = c * chunk, i1 = std::min(lp[b] - lop[b], i0 + chunk);
      if (i0 >= i1) {  // this row has fewer keys than the longest: an empty chunk weighs 0
        std::fill(p + group * hd, p + group * hd + group, -std::numeric_limits<float>::infinity());
        std::fill(p + group * (hd + 1), p + stride, 0.0f);
        continue;
      }
      attend_keys(b, g, i0, i1, p, p + group * hd, p + group * (hd + 1), scores, offs);
    }
  });
  at::parallel_for(0, pairs, std::max<int64_t>(1, kMinParallelWork / (chunks * group * hd)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t b = pair / Hkv, g = pair % Hkv;
      const float* base = partial.data() + pair * chunks * stride;
      for (int64_t h = 0; h < group; ++h) {
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, base[c * stride + group * hd + h]);
        float* o = op + (b * H + g * group + h) * hd;
        std::fill(o, o + hd, 0.0f);
        float total = 0.0f;
        for (int64_t c = 0; c < chunks; ++c) {
          const float* pc = base + c * stride;
          const float w = std::exp(pc[group * hd + h] - mx);  // 0 for an empty chunk
          total += w * pc[group * (hd + 1) + h];
          for (int64_t d = 0; d < hd; ++d) o[d] += w * pc[h * hd + d];
        }
        const float inv = 1.0f / total;
        for (int64_t d = 0; d < hd; ++d) o[d] *= inv;
      }
    }
  });
}

}  // namespace quiver
