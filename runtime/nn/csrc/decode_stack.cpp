// The decoder's layers for a pure decode step, in C++: the same ATen ops as the Python modules,
// in the same order, without Python's per-op cost (runtime/nn/native.py says when it runs).
//
//   x [T, hidden] fp32 (T decode rows, one token each)
//   per layer:
//     h = rms_norm(x, ln1)                              [T, hidden]  (csrc/elementwise.cpp)
//     q|k|v = fused4bit(h, qkv) (+ bias)                [T, (H + 2 Hkv) hd]   (bf16 inside)
//     q, k = rotate(q, cos, sin), rotate(k, cos, sin)   [T, H, hd], [T, Hkv, hd]
//     cache[layer] rows write_index <- k, v
//     o = paged attention over the cache               [T, H, hd]  (csrc/paged_attention.cpp)
//     x = x + fused4bit(o, o_proj)
//     h = rms_norm(x, ln2)
//     g|u = fused4bit(h, gate_up)                       [T, 2 inter]
//     x = x + fused4bit(silu(g) * u, down)              (without adapters or biases there:
//                                                        bf16 g|u -> bf16 silu(g) * u, one pass)
//   each projection's output then gets its LoRA / DoRA delta where the step has adapter rows
//   (runtime/nn/lora.py: the "runs" path; the gather path stays in Python)
//
// `step_logits` is the whole step from token ids to logits in one call (what
// DecoderModel.forward runs where the stack and its head apply, runtime/nn/native.py):
//   x = embedding[tokens]; cos, sin = the rotary tables' rows at positions     [T, hidden]
//   x = forward(x, ...)[logits_rows]; x = rms_norm(x, final norm)
//   logits = LmHead.forward(x): the exact matmul, or int8 / bf16 then the exact top-k pass
// Why one call: after a step has streamed ~80 MB of weights through the caches, each Python op
// around the layers runs cold (measured, batch 1: the first torch op after the layers 56 us
// against 5 us warm, the embedding lookup 111 against 7); the seven such ops of a step cost
// ~0.3-0.6 ms of a ~4 ms batch-1 step.
//
// A pure decode step on a model without projection biases whose LoRA rows (if any) are short
// runs without DoRA (the serving case: every stream one token) takes `plain_forward`: the same
// loops on raw rows in buffers kept from step to step, in place on one residual stream. No ATen
// op runs between the kernels there: at batch 1 the ~25 a layer (allocations, views, the
// contiguity and dtype checks) were ~13 us of a layer's ~70.
//
// Each step mirrors runtime/nn/model.py, runtime/nn/attention.py, runtime/nn/rotary.py and
// runtime/nn/kernels.py::fused_matmul op for op, so both paths give the same bits
// (tests/nn/test_native.py). The 4-bit matmul is bitsandbytes' fused CPU kernel, whose address
// Python hands over once (bitsandbytes' own shared library; nothing of it is linked here).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <optional>
#include <vector>

namespace quiver {
// csrc/paged_attention.cpp
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& pool, int64_t layer,
                                  const at::Tensor& table, const at::Tensor& lens,
                                  const at::Tensor& los);
void paged_decode_attention_into(const float* q, int64_t B, int64_t H, int64_t hd, const at::Tensor& pool,
                                 int64_t layer, const int64_t* table, int64_t nb, const int64_t* lens,
                                 const int64_t* los, float* out);
// csrc/elementwise.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
void rms_norm_rows(const float* x, const float* w, int64_t rows, int64_t n, double eps, float* out);
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
void rotate_rows(const float* x, int64_t st, int64_t sh, const float* cos, const float* sin, int64_t T, int64_t H,
                 int64_t hd, float* out);
at::Tensor silu_mul(const at::Tensor& g, const at::Tensor& u);
void silu_mul_rows(const float* g, int64_t gs, const float* u, int64_t us, int64_t T, int64_t n, float* out);
void silu_mul_bf16_rows(const at::BFloat16* gu, int64_t T, int64_t n, at::BFloat16* out);
void convert_bf16(const float* src, at::BFloat16* dst, int64_t n);
void convert_bf16(const at::BFloat16* src, float* dst, int64_t n);
at::Tensor silu_mul_bf16(const at::Tensor& gu);
at::Tensor argmax_rows(const at::Tensor& x);
// csrc/lora_rows.cpp
at::Tensor lora_rows(const at::Tensor& y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& Bt,
                     double scale, const std::optional<at::Tensor>& bias);
void lora_rows_(at::Tensor y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& Bt,
                double scale, const std::optional<at::Tensor>& bias);
void lora_runs_into(at::Tensor& y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& Bt,
                    const at::Tensor& bias, const at::Tensor& meta, const int64_t* runs, int64_t num_runs);
void lora_runs_(at::Tensor y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& Bt,
                const at::Tensor& bias, const at::Tensor& meta, const at::Tensor& runs);
// csrc/nf4_gemv.cpp
at::Tensor nf4_gemv(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
                    const at::Tensor& lut, int64_t n, int64_t blocksize);
// csrc/threads.cpp
std::vector<int64_t> bind_threads(const std::vector<int64_t>& cpus);
// csrc/lm_head.cpp
at::Tensor lm_head_refine(const at::Tensor& approx, const at::Tensor& x, const at::Tensor& W, int64_t k);
at::Tensor lm_head_int8(const at::Tensor& x, const at::Tensor& W8, const at::Tensor& scale);
// up to this many rows a run's LoRA takes csrc/lora_rows.cpp's pass (lora.py: LORA_ROWS_MAX)
constexpr int64_t kLoraRowsMax = 8;
}  // namespace quiver

namespace {

// Elements per thread of the conversion loops: below it one thread does it (a parallel region
// costs microseconds); a 32-row step's activations (32 x 576 .. 32 x 3072) split over two.
constexpr int64_t kConvertGrain = 1 << 13;

// gemv_4bit_inference_cpu_{nf4,fp4}_bf16(M, N, K, A, B, absmax, out, blocksize, A_strideM,
// out_strideM): bitsandbytes' C signature
using Kernel = void (*)(int64_t, int64_t, int64_t, const void*, const void*, const void*, void*,
                        int64_t, int64_t, int64_t);

struct Fused4bit {
  at::Tensor packed;  // [n, k/2] uint8, the kernel's tiles
  at::Tensor absmax;  // [k/blocksize, n] bf16
  std::optional<at::Tensor> bias;  // [n] in the activation dtype
  int64_t n = 0;
  int64_t k = 0;
};

// runtime/nn/lora.py::LoraSlots, by reference (its tensors are updated in place on load)
struct LoraSlots {
  at::Tensor A;     // [S+1, R, in] fp32 or bf16 (--adapter-dtype); everything else fp32
  at::Tensor Bt;    // [S+1, R, out]
  at::Tensor scale; // [S+1]
  at::Tensor bias;  // [S+1, out] (pre-scaled)
  at::Tensor meta;  // [S+1, 3] float64: rank, scale, has_bias
  at::Tensor dora;  // [S+1, out] DoRA's per-row factor f (1 for plain LoRA slots)
  std::optional<at::Tensor> base_bias;  // the projection's own bias (DoRA scales around it)
  bool defined() const { return A.defined(); }
  int64_t rank(int64_t slot) const { return static_cast<int64_t>(meta.data_ptr<double>()[3 * slot]); }
  double scale_of(int64_t slot) const { return meta.data_ptr<double>()[3 * slot + 1]; }
  bool has_bias(int64_t slot) const { return meta.data_ptr<double>()[3 * slot + 2] != 0.0; }
};

// runtime/nn/lm_head.py::LmHead with the final norm before it, as `set_head` hands them over
struct Head {
  at::Tensor norm;      // [hidden] the final RMSNorm's weight
  double eps = 0.0;
  at::Tensor weight;    // [V, hidden] fp32: the exact matmul, and the exact top-k pass's rows
  std::optional<at::Tensor> int8, int8_scale, bf16;  // the approximate copies (LmHead.use)
  int64_t int8_max_rows = 0;  // lm_head.py INT8_MAX_ROWS
  int64_t exact_top = 0;      // lm_head.py EXACT_TOP
  bool defined() const { return weight.defined(); }
};

// Projection order within a layer (runtime/nn/native.py::MEMBERS)
enum Member { kQ, kK, kV, kO, kGate, kUp, kDown, kMembers };

struct Layer {
  at::Tensor ln1, ln2;  // [hidden]
  Fused4bit qkv, o, gate_up, down;
  LoraSlots lora[kMembers];
};

// runtime/nn/attention.py::AttentionBatch, the parts attend reads
struct StepAttention {
  bool all_decode = false;  // every row one decode token, row i = token i
  std::optional<at::Tensor> decode_tokens;  // [Bd] packed index of each decode row (else all)
  std::optional<at::Tensor> table, lens, los;  // decode rows: paged kernel metadata
  // rows attended one by one (prefill chunks): SDPA over their gathered blocks, causal mask
  std::vector<int64_t> row_start, row_len, row_kv;
  std::vector<at::Tensor> row_table, row_mask;  // [1, nb] block ids, [q_len, kv_len] bool
};

// runtime/nn/adapter_batch.py::AdapterBatch, the parts the LoRA paths read
struct StepAdapters {
  int64_t path = 0;  // 0: no LoRA rows; 1: runs
  bool any_dora = false;
  at::Tensor token_slots;  // [T] slot per token (DoRA's factor rows)
  // the step's runs (slot, start, end), split once for every projection: those of up to
  // kLoraRowsMax rows flat for csrc/lora_rows.cpp's pass (which skips slots of rank 0), the
  // longer ones (prompt chunks) for one addmm each
  std::vector<int64_t> short_runs;
  std::vector<std::array<int64_t, 3>> long_runs;
};

Fused4bit make_fused(at::Tensor packed, at::Tensor absmax, std::optional<at::Tensor> bias,
                     int64_t n, int64_t k) {
  TORCH_CHECK(packed.is_contiguous() && absmax.is_contiguous(), "fused weights must be contiguous");
  TORCH_CHECK(absmax.scalar_type() == at::kBFloat16, "fused absmax must be bf16");
  return Fused4bit{std::move(packed), std::move(absmax), std::move(bias), n, k};
}

class DecodeStack {
 public:
  DecodeStack(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t inter, double eps,
              int64_t blocksize, int64_t kernel_address)
      : heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), inter_(inter), eps_(eps),
        blocksize_(blocksize), kernel_(reinterpret_cast<Kernel>(kernel_address)) {
    TORCH_CHECK(kernel_address != 0, "no fused 4-bit kernel");
  }

  void add_layer(at::Tensor ln1, at::Tensor ln2,
                 at::Tensor qkv_w, at::Tensor qkv_a, std::optional<at::Tensor> qkv_b,
                 at::Tensor o_w, at::Tensor o_a, std::optional<at::Tensor> o_b,
                 at::Tensor gu_w, at::Tensor gu_a, std::optional<at::Tensor> gu_b,
                 at::Tensor dn_w, at::Tensor dn_a, std::optional<at::Tensor> dn_b) {
    const int64_t hidden = ln1.size(0), q_dim = heads_ * head_dim_;
    const int64_t qkv_n = (heads_ + 2 * kv_heads_) * head_dim_;
    Layer l;
    l.ln1 = std::move(ln1);
    l.ln2 = std::move(ln2);
    l.qkv = make_fused(std::move(qkv_w), std::move(qkv_a), std::move(qkv_b), qkv_n, hidden);
    l.o = make_fused(std::move(o_w), std::move(o_a), std::move(o_b), hidden, q_dim);
    l.gate_up = make_fused(std::move(gu_w), std::move(gu_a), std::move(gu_b), 2 * inter_, hidden);
    l.down = make_fused(std::move(dn_w), std::move(dn_a), std::move(dn_b), hidden, inter_);
    biased_ = biased_ || l.qkv.bias || l.o.bias || l.gate_up.bias || l.down.bias;
    layers_.push_back(std::move(l));
  }

  // One projection's LoRA slots (member: the Member order); kept by reference.
  void set_lora(int64_t layer, int64_t member, at::Tensor A, at::Tensor Bt, at::Tensor scale,
                at::Tensor bias, at::Tensor meta, at::Tensor dora, std::optional<at::Tensor> base_bias) {
    TORCH_CHECK(layer >= 0 && layer < num_layers() && member >= 0 && member < kMembers, "bad LoRA index");
    TORCH_CHECK(meta.scalar_type() == at::kDouble && meta.is_contiguous(), "slot_meta must be float64");
    layers_[layer].lora[member] = LoraSlots{std::move(A), std::move(Bt), std::move(scale), std::move(bias),
                                            std::move(meta), std::move(dora), std::move(base_bias)};
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // The token embedding [V, hidden] fp32 (kept by reference), for `step_logits`.
  void set_embedding(at::Tensor embedding) {
    TORCH_CHECK(embedding.scalar_type() == at::kFloat && embedding.dim() == 2 && embedding.is_contiguous(),
                "the embedding must be a contiguous fp32 [vocab, hidden] table");
    embedding_ = std::move(embedding);
  }

  // The final norm and LmHead's tensors (kept by reference; runtime/nn/native.py hands them
  // over after LmHead.use, and again whenever the model picks kernels anew).
  void set_head(at::Tensor norm, double eps, at::Tensor weight, std::optional<at::Tensor> int8,
                std::optional<at::Tensor> int8_scale, std::optional<at::Tensor> bf16, int64_t int8_max_rows,
                int64_t exact_top) {
    TORCH_CHECK(norm.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && weight.is_contiguous(),
                "the head runs on an fp32 norm and a contiguous fp32 weight");
    TORCH_CHECK(int8.has_value() == int8_scale.has_value(), "int8 weights come with their scales");
    TORCH_CHECK(!int8 || bf16, "the int8 copy comes with the bf16 one (LmHead.use)");
    head_ = Head{std::move(norm), eps, std::move(weight), std::move(int8), std::move(int8_scale),
                 std::move(bf16), int8_max_rows, exact_top};
  }

  bool has_head() const { return head_.defined() && embedding_.defined(); }

  // The whole step (see the top of this file): logits [len(logits_rows) or T, V] fp32, or None
  // when a position is past the rotary tables (the caller grows them and runs the modules;
  // nothing has been written then). Token ids outside the vocabulary raise IndexError, as
  // the embedding does, also before anything is written.
  std::optional<at::Tensor> step_logits(
      const at::Tensor& tokens, const at::Tensor& positions, const at::Tensor& cos_table,
      const at::Tensor& sin_table, const std::optional<at::Tensor>& logits_rows, const at::Tensor& pool,
      const at::Tensor& write_index, const std::optional<at::Tensor>& decode_tokens,
      const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& lens,
      const std::optional<at::Tensor>& los, std::vector<int64_t> row_start, std::vector<int64_t> row_len,
      std::vector<int64_t> row_kv, std::vector<at::Tensor> row_table, std::vector<at::Tensor> row_mask,
      int64_t lora_path, const std::optional<at::Tensor>& runs, bool any_dora,
      const std::optional<at::Tensor>& token_slots) const {
    at::NoGradGuard no_grad;
    TORCH_CHECK(has_head(), "step_logits needs set_embedding and set_head");
    TORCH_CHECK(tokens.dim() == 1 && positions.sizes() == tokens.sizes(), "tokens and positions: [T] each");
    TORCH_CHECK(cos_table.scalar_type() == at::kFloat && sin_table.scalar_type() == at::kFloat &&
                    cos_table.is_contiguous() && sin_table.is_contiguous() && cos_table.sizes() == sin_table.sizes() &&
                    cos_table.size(1) == head_dim_,
                "rotary tables: contiguous fp32 [P, head_dim] each");
    const at::Tensor ids = tokens.to(at::kLong).contiguous(), pos = positions.to(at::kLong).contiguous();
    const int64_t T = ids.size(0), V = embedding_.size(0), hidden = embedding_.size(1), P = cos_table.size(0);
    const int64_t* ip = ids.data_ptr<int64_t>();
    const int64_t* pp = pos.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK_INDEX(0 <= ip[t] && ip[t] < V, "index ", ip[t], " is out of range of the ", V, "-token embedding");
      TORCH_CHECK(pp[t] >= 0, "negative position ", pp[t]);
      if (pp[t] >= P) return std::nullopt;  // Rotary.cos_sin grows its tables (Python)
    }
    // DecoderModel.embed and Rotary.cos_sin: row copies, the same values as the lookups
    at::Tensor x = at::empty({T, hidden}, embedding_.options());
    at::Tensor cos = at::empty({T, 1, head_dim_}, cos_table.options()), sin = at::empty_like(cos);
    const float* ep = embedding_.data_ptr<float>();
    const float* cp = cos_table.data_ptr<float>();
    const float* sp = sin_table.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t) {
      std::memcpy(x.data_ptr<float>() + t * hidden, ep + ip[t] * hidden, hidden * sizeof(float));
      std::memcpy(cos.data_ptr<float>() + t * head_dim_, cp + pp[t] * head_dim_, head_dim_ * sizeof(float));
      std::memcpy(sin.data_ptr<float>() + t * head_dim_, sp + pp[t] * head_dim_, head_dim_ * sizeof(float));
    }
    x = forward(x, cos, sin, pool, write_index, decode_tokens, table, lens, los, std::move(row_start),
                std::move(row_len), std::move(row_kv), std::move(row_table), std::move(row_mask), lora_path,
                runs, any_dora, token_slots);
    if (logits_rows) x = x.index({*logits_rows});
    return head(quiver::rms_norm(x, head_.norm, head_.eps));
  }

  // The bench's floor (bench/decode_bench.py): every layer's four fused 4-bit matmuls for
  // `rows` rows on ready bf16 inputs, called back to back from here: the kernels' own time,
  // nothing else (no conversion, no dispatch, no Python).
  void matmul_floor(int64_t rows) const {
    at::NoGradGuard no_grad;
    const auto opts = at::TensorOptions().dtype(at::kBFloat16);
    std::vector<at::Tensor> in, out;
    for (const Fused4bit* w : {&layers_[0].qkv, &layers_[0].o, &layers_[0].gate_up, &layers_[0].down}) {
      in.push_back(at::full({rows, w->k}, 0.01, opts));  // the kernel has no value-dependent path
      out.push_back(at::empty({rows, w->n}, opts));
    }
    for (const Layer& l : layers_) {
      const Fused4bit* ws[] = {&l.qkv, &l.o, &l.gate_up, &l.down};
      for (int j = 0; j < 4; ++j) {
        const Fused4bit& w = *ws[j];
        kernel_(rows, w.n, w.k, in[j].data_ptr(), w.packed.data_ptr(), w.absmax.data_ptr(),
                out[j].data_ptr(), blocksize_, in[j].stride(0), out[j].stride(0));
      }
    }
  }

  // x [T, hidden], cos/sin [T, 1, hd] (Rotary.cos_sin), pool [L, 2, blocks, bs, Hkv, hd],
  // write_index [T]. Keys: decode row j reads keys los[j]..lens[j]-1 through its block table
  // (attention.py's decode group, paged; decode_tokens: where the decode rows sit, None when
  // every row is one); each other row (a prefill chunk) is attended alone (row_* lists).
  // Adapters: lora_path 0 (none) or 1 (runs [n, 3]: slot, start, end).
  // Returns x after the last layer.
  at::Tensor forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin,
                     const at::Tensor& pool, const at::Tensor& write_index,
                     const std::optional<at::Tensor>& decode_tokens,
                     const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& lens,
                     const std::optional<at::Tensor>& los, std::vector<int64_t> row_start,
                     std::vector<int64_t> row_len, std::vector<int64_t> row_kv,
                     std::vector<at::Tensor> row_table, std::vector<at::Tensor> row_mask,
                     int64_t lora_path, const std::optional<at::Tensor>& runs, bool any_dora,
                     const std::optional<at::Tensor>& token_slots) const {
    at::NoGradGuard no_grad;
    StepAttention sa;
    sa.all_decode = row_start.empty() && !decode_tokens;
    sa.decode_tokens = decode_tokens, sa.table = table, sa.lens = lens, sa.los = los;
    sa.row_start = std::move(row_start), sa.row_len = std::move(row_len), sa.row_kv = std::move(row_kv);
    sa.row_table = std::move(row_table), sa.row_mask = std::move(row_mask);
    TORCH_CHECK(sa.row_len.size() == sa.row_start.size() && sa.row_kv.size() == sa.row_start.size() &&
                    sa.row_table.size() == sa.row_start.size() && sa.row_mask.size() == sa.row_start.size(),
                "looped rows: lists of different lengths");
    StepAdapters ad;
    ad.path = lora_path;
    ad.any_dora = any_dora;
    if (any_dora) ad.token_slots = *token_slots;
    TORCH_CHECK(lora_path == 0 || lora_path == 1, "LoRA path must be 0 (none) or 1 (runs)");
    if (lora_path == 1) {
      const at::Tensor r = runs->contiguous();
      const int64_t* p = r.data_ptr<int64_t>();
      for (int64_t i = 0; i < r.size(0); ++i) {
        const int64_t slot = p[3 * i], a = p[3 * i + 1], b = p[3 * i + 2];
        if (b - a <= quiver::kLoraRowsMax) ad.short_runs.insert(ad.short_runs.end(), {slot, a, b});
        else ad.long_runs.push_back({slot, a, b});
      }
    }
    if (sa.all_decode && !biased_ && x.is_contiguous() && x.scalar_type() == at::kFloat &&
        (ad.path == 0 || (!ad.any_dora && ad.long_runs.empty())))
      return plain_forward(x, cos, sin, pool, write_index, sa, ad);
    for (int64_t i = 0; i < num_layers(); ++i) {
      const Layer& l = layers_[i];
      at::Tensor h = quiver::rms_norm(x, l.ln1, eps_);
      at::Tensor o = attention(h, l, i, cos, sin, pool, write_index, sa, ad);
      x = residual(x, o, l.o, l.lora[kO], ad);
      h = quiver::rms_norm(x, l.ln2, eps_);
      x = mlp(x, h, l, ad);
    }
    return x;
  }

 private:
  // runtime/nn/kernels.py::fused_matmul (+ the projection's bias): x [M, k] fp32 -> [M, n] fp32
  // (bf16 inside). The two conversions are loops here (round to nearest even, as ATen's), not
  // two ATen copies a matmul.
  at::Tensor matmul(const at::Tensor& x, const Fused4bit& w) const {
    const at::Tensor& out = kernel_out(x, w);  // [M, n] bf16
    at::Tensor y = at::empty({x.size(0), w.n}, x.options());  // [M, n] fp32
    convert(out.data_ptr<at::BFloat16>(), y.data_ptr<float>(), y.numel());
    return w.bias ? y + w.bias->to(y.scalar_type()) : y;
  }

  // x + MLP(h): Python's MLP.forward, with silu_mul (csrc/elementwise.cpp) as the modules call
  // it. Where no adapter touches the MLP and it has no bias, gate/up's bf16 output goes to
  // down's bf16 input in one pass (silu_mul_bf16_rows: the same bits as converting to fp32,
  // silu_mul, converting back), and down's output into the residual add.
  at::Tensor mlp(const at::Tensor& x, const at::Tensor& h, const Layer& l, const StepAdapters& ad) const {
    const bool adapted = ad.path != 0 && (l.lora[kGate].defined() || l.lora[kUp].defined() ||
                                          l.lora[kDown].defined());
    if (adapted || l.gate_up.bias || l.down.bias || !x.is_contiguous()) {
      std::vector<at::Tensor> gu = matmul(h, l.gate_up).split({inter_, inter_}, -1);
      at::Tensor g = adapt(h, gu[0], l.lora[kGate], ad), u = adapt(h, gu[1], l.lora[kUp], ad);
      return residual(x, quiver::silu_mul(g, u), l.down, l.lora[kDown], ad);
    }
    const int64_t T = h.size(0);
    const at::Tensor& gu = kernel_out(h, l.gate_up);  // [T, 2 inter] bf16
    at::Tensor& a = activation_buffer(T * inter_);  // [T, inter] bf16: down's input
    quiver::silu_mul_bf16_rows(gu.data_ptr<at::BFloat16>(), T, inter_, a.data_ptr<at::BFloat16>());
    return add_output(x, run_kernel(a, T, l.down));
  }

  // x + matmul(in, w) + m's delta (the residual stream after o_proj / down_proj). Where no
  // adapter row touches this projection and it has no bias, the add is fused into the output's
  // conversion: r = x + float(out), one pass, the same single fp32 rounding as ATen's add.
  at::Tensor residual(const at::Tensor& x, const at::Tensor& in, const Fused4bit& w, const LoraSlots& m,
                      const StepAdapters& ad) const {
    if ((ad.path != 0 && m.defined()) || w.bias || !x.is_contiguous())
      return x + adapt(in, matmul(in, w), m, ad);
    return add_output(x, kernel_out(in, w));
  }

  // x + float(out): a kernel's bf16 output [M, hidden] added into the residual stream, one pass
  at::Tensor add_output(const at::Tensor& x, const at::Tensor& out) const {
    at::Tensor r = at::empty_like(x);
    add_rows(x.data_ptr<float>(), out.data_ptr<at::BFloat16>(), r.data_ptr<float>(), r.numel());
    return r;
  }

  // The fused kernel on x [M, k] fp32 (rounded to bf16, as bitsandbytes' op does): its bf16
  // output [M, n] in this thread's scratch, valid until the next call.
  const at::Tensor& kernel_out(const at::Tensor& x, const Fused4bit& w) const {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == w.k, "fused matmul input");
    const at::Tensor xc = x.contiguous();
    const int64_t M = xc.size(0);
    at::Tensor& a = input_buffer(M * w.k);  // [M, k] bf16
    convert(xc.data_ptr<float>(), a.data_ptr<at::BFloat16>(), M * w.k);
    return run_kernel(a, M, w);
  }

  // The fused kernel on a ready bf16 input a [M, k] (scratch of at least M * k): its output
  // [M, n] bf16 in this thread's kernel buffer, valid until the next call.
  const at::Tensor& run_kernel(const at::Tensor& a, int64_t M, const Fused4bit& w) const {
    run_kernel_raw(a.data_ptr<at::BFloat16>(), M, w);
    return kernel_buffer(M * w.n);
  }

  // The same on raw rows: a pointer to the output in the kernel buffer.
  const at::BFloat16* run_kernel_raw(const at::BFloat16* a, int64_t M, const Fused4bit& w) const {
    at::Tensor& out = kernel_buffer(M * w.n);
    kernel_(M, w.n, w.k, a, w.packed.data_ptr(), w.absmax.data_ptr(), out.data_ptr(), blocksize_, w.k, w.n);
    return out.data_ptr<at::BFloat16>();
  }

  // This thread's bf16 buffers (at least n elements each), reused by every step of both paths:
  // the kernels' outputs, their inputs, and the MLP's activation (down's input)
  static at::Tensor& kernel_buffer(int64_t n) {
    thread_local at::Tensor buf;
    return scratch(buf, n);
  }
  static at::Tensor& input_buffer(int64_t n) {
    thread_local at::Tensor buf;
    return scratch(buf, n);
  }
  static at::Tensor& activation_buffer(int64_t n) {
    thread_local at::Tensor buf;
    return scratch(buf, n);
  }

  // A bf16 buffer of at least n elements, grown as needed and kept for the next call: the
  // fused kernel's input and output live only until the next `kernel_out` (thread-local
  // buffers: engines stepping one model from several threads each get their own).
  static at::Tensor& scratch(at::Tensor& buf, int64_t n) {
    if (!buf.defined() || buf.numel() < n) buf = at::empty({n}, at::TensorOptions().dtype(at::kBFloat16));
    return buf;
  }

  // fp32 <-> bf16 (csrc/elementwise.cpp convert_bf16: c10::BFloat16's rounding), split over
  // the threads from kConvertGrain elements
  template <typename From, typename To>
  static void convert(const From* src, To* dst, int64_t n) {
    at::parallel_for(0, n, kConvertGrain, [&](int64_t begin, int64_t end) {
      quiver::convert_bf16(src + begin, dst + begin, end - begin);
    });
  }

  // AdaptedLinear.adapt: y = base(x) [T, out] -> y + this projection's LoRA delta
  // (LoraSlots.forward: with DoRA rows in the step, y + (f - 1) * (y - b0) + f * delta)
  at::Tensor adapt(const at::Tensor& x, at::Tensor y, const LoraSlots& m, const StepAdapters& ad) const {
    if (ad.path == 0 || !m.defined()) return y;
    if (!ad.any_dora) return add_runs(m, x, std::move(y), ad);
    at::Tensor delta = add_runs(m, x, at::zeros({x.size(0), m.Bt.size(2)}, x.options()), ad);  // lora_delta
    at::Tensor f = m.dora.index({ad.token_slots});  // [T, out]
    at::Tensor y0 = m.base_bias ? y - *m.base_bias : y;
    return y + ((f - 1) * y0 + f * delta);
  }

  // lora.py::_add_runs: the short runs in one pass (csrc/lora_rows.cpp), one addmm per longer run.
  // In place: y is always this step's own (a projection's fresh output, or a view of one), so
  // the modules' defensive clone is not needed here (the same bits either way).
  at::Tensor add_runs(const LoraSlots& m, const at::Tensor& x, at::Tensor y, const StepAdapters& ad) const {
    for (const auto& [slot, a, b] : ad.long_runs) {
      const int64_t r = m.rank(slot);
      if (r == 0) continue;  // a slot this projection does not target
      at::Tensor A = m.A.select(0, slot).slice(0, 0, r).to(x.scalar_type());  // bf16 slots: widened
      at::Tensor Bt = m.Bt.select(0, slot).slice(0, 0, r).to(x.scalar_type());
      at::Tensor rows = y.slice(0, a, b);
      rows.addmm_(x.slice(0, a, b).mm(A.t()), Bt, 1, m.scale_of(slot));
      if (m.has_bias(slot)) rows += m.bias.select(0, slot);
    }
    if (!ad.short_runs.empty())
      quiver::lora_runs_into(y, x, m.A, m.Bt, m.bias, m.meta, ad.short_runs.data(),
                             static_cast<int64_t>(ad.short_runs.size() / 3));
    return y;
  }

  // KVCache.write (index_copy_ of k and v into the layer's flat rows), as row copies: the
  // same bytes without two ATen calls a layer. k, v [T, Hkv, hd] with contiguous rows.
  void write_cache(const at::Tensor& pool, int64_t layer, const at::Tensor& index,
                   const at::Tensor& k, const at::Tensor& v) const {
    TORCH_CHECK(index.scalar_type() == at::kLong && index.is_contiguous() && index.numel() == k.size(0),
                "KV write: one int64 row per token");
    for (const at::Tensor* src : {&k, &v})
      TORCH_CHECK(src->stride(2) == 1 && src->stride(1) == head_dim_, "KV write: rows must be contiguous");
    write_rows(pool, layer, index.data_ptr<int64_t>(), k.size(0), k.data_ptr<float>(), k.stride(0),
               v.data_ptr<float>(), v.stride(0));
  }

  // The same on raw rows: token t's key row (Hkv * hd floats) at k + t * ks, its value at
  // v + t * vs, to pool row index[t]. Every row is checked before the first is written.
  void write_rows(const at::Tensor& pool, int64_t layer, const int64_t* index, int64_t T, const float* k,
                  int64_t ks, const float* v, int64_t vs) const {
    TORCH_CHECK(pool.scalar_type() == at::kFloat && pool.is_contiguous(), "KV write: fp32 contiguous pool");
    const int64_t row = kv_heads_ * head_dim_, rows = pool.size(2) * pool.size(3);
    for (int64_t t = 0; t < T; ++t)
      TORCH_CHECK(0 <= index[t] && index[t] < rows, "KV write: row ", index[t], " outside the pool's ", rows);
    float* base = pool.data_ptr<float>() + layer * 2 * rows * row;
    for (int64_t t = 0; t < T; ++t) {
      std::memcpy(base + index[t] * row, k + t * ks, row * sizeof(float));
      std::memcpy(base + (rows + index[t]) * row, v + t * vs, row * sizeof(float));
    }
  }

  // runtime/nn/rotary.py::rotate: x [T, heads, hd] (csrc/elementwise.cpp, as the modules)
  at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) const {
    return quiver::rotate(x, cos, sin);
  }

  // Attention.forward up to o_proj's input: h [T, hidden] -> [T, H * hd]
  at::Tensor attention(const at::Tensor& h, const Layer& l, int64_t layer, const at::Tensor& cos,
                       const at::Tensor& sin, const at::Tensor& pool, const at::Tensor& write_index,
                       const StepAttention& sa, const StepAdapters& ad) const {
    const int64_t T = h.size(0), q_dim = heads_ * head_dim_, kv_dim = kv_heads_ * head_dim_;
    std::vector<at::Tensor> qkv = matmul(h, l.qkv).split({q_dim, kv_dim, kv_dim}, -1);
    at::Tensor q = rotate(adapt(h, qkv[0], l.lora[kQ], ad).view({T, heads_, head_dim_}), cos, sin);
    at::Tensor k = rotate(adapt(h, qkv[1], l.lora[kK], ad).view({T, kv_heads_, head_dim_}), cos, sin);
    at::Tensor v = adapt(h, qkv[2], l.lora[kV], ad).view({T, kv_heads_, head_dim_});
    write_cache(pool, layer, write_index, k, v);
    // attention.py::attend
    if (sa.all_decode)  // _attend_decode_group, paged
      return quiver::paged_decode_attention(q, pool, layer, *sa.table, *sa.lens, *sa.los).view({T, q_dim});
    at::Tensor out = at::empty_like(q);  // [T, H, hd]
    if (sa.decode_tokens && sa.decode_tokens->numel() > 0) {
      at::Tensor qd = q.index({*sa.decode_tokens});
      out.index_put_({*sa.decode_tokens},
                     quiver::paged_decode_attention(qd, pool, layer, *sa.table, *sa.lens, *sa.los));
    }
    for (size_t r = 0; r < sa.row_start.size(); ++r) {  // _attend_row over KVCache.gather
      const int64_t a = sa.row_start[r], n = sa.row_len[r], kv_len = sa.row_kv[r];
      const int64_t nb = sa.row_table[r].size(1), bs = pool.size(3);
      at::Tensor kv = pool.select(0, layer).index({at::indexing::Slice(), sa.row_table[r]});
      kv = kv.reshape({2, 1, nb * bs, kv_heads_, head_dim_}).transpose(2, 3);  // [2, 1, Hkv, L, hd]
      at::Tensor ks = kv.select(0, 0).slice(2, 0, kv_len), vs = kv.select(0, 1).slice(2, 0, kv_len);
      at::Tensor qs = q.slice(0, a, a + n).transpose(0, 1).unsqueeze(0);  // [1, H, n, hd]
      at::Tensor o = at::scaled_dot_product_attention(qs, ks.to(q.scalar_type()), vs.to(q.scalar_type()),
                                                      sa.row_mask[r], 0.0, false, std::nullopt,
                                                      kv_heads_ != heads_);  // [1, H, n, hd]
      out.slice(0, a, a + n).copy_(o.select(0, 0).transpose(0, 1));
    }
    return out.view({T, q_dim});
  }

  // forward's layers for a pure decode step without biases, its LoRA rows (if any) short runs
  // without DoRA (see the top of the file): x [T, hidden] -> a new [T, hidden]. Op for op the
  // general path's arithmetic, on raw rows: rms_norm_rows, the conversions, the kernels, each
  // projection's LoRA runs (lora_runs_into on its fp32 output, where the general path's
  // `adapt` runs them), rotate_rows, the cache rows' copies, paged_decode_attention_into, the
  // MLP's activation (bf16 straight to down's input, or in fp32 where adapters touch the MLP,
  // as `mlp`) and the residual adds, in that order.
  at::Tensor plain_forward(const at::Tensor& x_in, const at::Tensor& cos_, const at::Tensor& sin_,
                           const at::Tensor& pool, const at::Tensor& write_index, const StepAttention& sa,
                           const StepAdapters& ad) const {
    const int64_t T = x_in.size(0), hidden = x_in.size(1), hd = head_dim_;
    const int64_t q_dim = heads_ * hd, kv_dim = kv_heads_ * hd, qkv_n = q_dim + 2 * kv_dim;
    TORCH_CHECK(write_index.scalar_type() == at::kLong && write_index.is_contiguous() && write_index.numel() == T,
                "KV write: one int64 row per token");
    const at::Tensor cos = cos_.contiguous(), sin = sin_.contiguous();
    TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.numel() == T * hd &&
                    sin.numel() == T * hd, "rotate: cos/sin must be [T, 1, hd]");
    const at::Tensor table = sa.table->to(at::kLong).contiguous(), lens = sa.lens->to(at::kLong).contiguous(),
                     los = sa.los->to(at::kLong).contiguous();
    TORCH_CHECK(table.dim() == 2 && table.size(0) == T && lens.numel() == T && los.numel() == T,
                "one block table, length and first key per row");
    const int64_t* wi = write_index.data_ptr<int64_t>();

    at::Tensor out = x_in.clone();  // the residual stream, updated in place layer by layer
    float* x = out.data_ptr<float>();
    thread_local std::vector<float> hf, qkvf, qr, kr, att, yf, guf, actf;  // fp32 rows kept for the next step
    hf.resize(T * hidden), qkvf.resize(T * qkv_n), qr.resize(T * q_dim), kr.resize(T * kv_dim), att.resize(T * q_dim);
    if (ad.path != 0) yf.resize(T * hidden), guf.resize(T * 2 * inter_), actf.resize(T * inter_);
    at::BFloat16* in = input_buffer(T * std::max(hidden, q_dim)).data_ptr<at::BFloat16>();  // a kernel's input
    at::BFloat16* act = activation_buffer(T * inter_).data_ptr<at::BFloat16>();  // down's input
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    for (int64_t i = 0; i < num_layers(); ++i) {
      const Layer& l = layers_[i];
      // attention: q|k|v = qkv(norm(x)) (+ LoRA); rotate q, k; write k, v; attend; x += o_proj(.)
      quiver::rms_norm_rows(x, l.ln1.data_ptr<float>(), T, hidden, eps_, hf.data());
      convert(hf.data(), in, T * hidden);
      convert(run_kernel_raw(in, T, l.qkv), qkvf.data(), T * qkv_n);
      lora_raw(l.lora[kQ], ad, qkvf.data(), qkv_n, q_dim, hf.data(), hidden, hidden, T);
      lora_raw(l.lora[kK], ad, qkvf.data() + q_dim, qkv_n, kv_dim, hf.data(), hidden, hidden, T);
      lora_raw(l.lora[kV], ad, qkvf.data() + q_dim + kv_dim, qkv_n, kv_dim, hf.data(), hidden, hidden, T);
      quiver::rotate_rows(qkvf.data(), qkv_n, hd, cp, sp, T, heads_, hd, qr.data());
      quiver::rotate_rows(qkvf.data() + q_dim, qkv_n, hd, cp, sp, T, kv_heads_, hd, kr.data());
      write_rows(pool, i, wi, T, kr.data(), kv_dim, qkvf.data() + q_dim + kv_dim, qkv_n);
      quiver::paged_decode_attention_into(qr.data(), T, heads_, hd, pool, i, table.data_ptr<int64_t>(), table.size(1),
                                          lens.data_ptr<int64_t>(), los.data_ptr<int64_t>(), att.data());
      convert(att.data(), in, T * q_dim);
      residual_raw(x, run_kernel_raw(in, T, l.o), l.lora[kO], ad, att.data(), q_dim, T, hidden, yf);
      // MLP: x += down(silu(gate) * up) (+ LoRA), gate|up = gate_up(norm(x))
      quiver::rms_norm_rows(x, l.ln2.data_ptr<float>(), T, hidden, eps_, hf.data());
      convert(hf.data(), in, T * hidden);
      const at::BFloat16* gu = run_kernel_raw(in, T, l.gate_up);
      if (ad.path != 0 && (l.lora[kGate].defined() || l.lora[kUp].defined() || l.lora[kDown].defined())) {
        convert(gu, guf.data(), T * 2 * inter_);  // `mlp`'s adapted form: fp32 g, u, activation
        lora_raw(l.lora[kGate], ad, guf.data(), 2 * inter_, inter_, hf.data(), hidden, hidden, T);
        lora_raw(l.lora[kUp], ad, guf.data() + inter_, 2 * inter_, inter_, hf.data(), hidden, hidden, T);
        quiver::silu_mul_rows(guf.data(), 2 * inter_, guf.data() + inter_, 2 * inter_, T, inter_, actf.data());
        convert(actf.data(), act, T * inter_);
        residual_raw(x, run_kernel_raw(act, T, l.down), l.lora[kDown], ad, actf.data(), inter_, T, hidden, yf);
      } else {
        quiver::silu_mul_bf16_rows(gu, T, inter_, act);
        add_rows(x, run_kernel_raw(act, T, l.down), x, T * hidden);
      }
    }
    return out;
  }

  // y [T, on] (row stride ys) += this projection's LoRA delta of x [T, in] (row stride xs):
  // `adapt`'s runs, in place, where the step has LoRA rows and the projection has slots
  void lora_raw(const LoraSlots& m, const StepAdapters& ad, float* y, int64_t ys, int64_t on, const float* x,
                int64_t xs, int64_t in, int64_t T) const {
    if (ad.path == 0 || !m.defined() || ad.short_runs.empty()) return;
    const auto opts = at::TensorOptions().dtype(at::kFloat);
    at::Tensor yv = at::from_blob(y, {T, on}, {ys, 1}, opts);
    const at::Tensor xv = at::from_blob(const_cast<float*>(x), {T, in}, {xs, 1}, opts);
    quiver::lora_runs_into(yv, xv, m.A, m.Bt, m.bias, m.meta, ad.short_runs.data(),
                           static_cast<int64_t>(ad.short_runs.size() / 3));
  }

  // x += the projection's output o (bf16 [T, n]) and, where `residual` adapts it, its LoRA
  // delta of in [T, in_n]: then o in fp32 (yf), the delta added there, x += yf
  void residual_raw(float* x, const at::BFloat16* o, const LoraSlots& m, const StepAdapters& ad, const float* in,
                    int64_t in_n, int64_t T, int64_t n, std::vector<float>& yf) const {
    if (ad.path == 0 || !m.defined()) return add_rows(x, o, x, T * n);
    convert(o, yf.data(), T * n);
    lora_raw(m, ad, yf.data(), n, n, in, in_n, in_n, T);
    add_rows(x, yf.data(), x, T * n);
  }

  // out[i] = x[i] + float(y[i]) over n elements, out possibly x itself (in place): every
  // residual add of both paths, y a kernel's bf16 output or an adapted projection's fp32 one
  template <typename Y>
  static void add_rows(const float* x, const Y* y, float* out, int64_t n) {
    at::parallel_for(0, n, kConvertGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) out[i] = x[i] + static_cast<float>(y[i]);
    });
  }

  // LmHead.forward for fp32 rows x [n, hidden] (no autograd): the exact matmul without the
  // approximate copies; else int8 up to int8_max_rows rows, bf16 above, then the exact top-k.
  at::Tensor head(const at::Tensor& x) const {
    if (!head_.bf16) return at::linear(x, head_.weight);
    const at::Tensor xb = x.to(at::kBFloat16);
    const at::Tensor approx = head_.int8 && x.size(0) <= head_.int8_max_rows
                                  ? at::_weight_int8pack_mm(xb, *head_.int8, *head_.int8_scale)
                                  : at::linear(xb, *head_.bf16);
    return quiver::lm_head_refine(approx, x, head_.weight, head_.exact_top);
  }

  int64_t heads_, kv_heads_, head_dim_, inter_;
  double eps_;
  int64_t blocksize_;
  Kernel kernel_;
  std::vector<Layer> layers_;
  bool biased_ = false;   // some projection has a bias: no plain path
  at::Tensor embedding_;  // [V, hidden] (set_embedding)
  Head head_;             // (set_head)
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<DecodeStack>(m, "DecodeStack")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, double, int64_t, int64_t>())
      .def("add_layer", &DecodeStack::add_layer)
      .def("set_lora", &DecodeStack::set_lora)
      .def("num_layers", &DecodeStack::num_layers)
      .def("set_embedding", &DecodeStack::set_embedding)
      .def("set_head", &DecodeStack::set_head)
      .def("step_logits", &DecodeStack::step_logits, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("matmul_floor", &DecodeStack::matmul_floor, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("forward", &DecodeStack::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("paged_decode_attention", &quiver::paged_decode_attention,
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rms_norm", &quiver::rms_norm, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("rotate", &quiver::rotate, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("silu_mul", &quiver::silu_mul, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("silu_mul_bf16", &quiver::silu_mul_bf16, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("argmax_rows", &quiver::argmax_rows, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("lora_rows", &quiver::lora_rows, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("lora_rows_", &quiver::lora_rows_, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("lora_runs_", &quiver::lora_runs_, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("lm_head_refine", &quiver::lm_head_refine, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("lm_head_int8", &quiver::lm_head_int8, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("nf4_gemv", &quiver::nf4_gemv, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("bind_threads", &quiver::bind_threads, pybind11::call_guard<pybind11::gil_scoped_release>());
}
