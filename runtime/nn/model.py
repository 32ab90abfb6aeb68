"""Quiver's Llama-family decoder: one implementation for Llama, Mistral, Qwen2 and SmolLM.

    tokens [T] --embed (+ embedding LoRA)--> x [T, hidden]
    repeat num_layers:
        x += o_proj(attend(rotate(q_proj(norm(x))), rotate(k_proj(..)), v_proj(..)))
        x += down_proj(silu(gate_proj(norm(x))) * up_proj(norm(x)))
    logits = lm_head(norm(x))[logits_rows]

The batch is packed (no padding): `AttentionBatch` says which tokens belong to which sequence and
where their keys live; `AdapterBatch` says which adapter slot each token uses. Every projection is
an `AdaptedLinear`: a frozen base (NF4 / FP4 / dense) plus optional per-slot LoRA weights.
The same modules serve the engine (with a KV cache) and the trainer (without, with autograd).
Module and parameter names follow HF (`model.layers.0.self_attn.q_proj`), so PEFT module names map
one to one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from runtime.config import ModelConfig, QuantConfig
from runtime.nn.adapter_batch import AdapterBatch
from runtime.nn.attention import AttentionBatch, attend
from runtime.nn.groups import ProjectionGroup
from runtime.nn.lm_head import LmHead
from runtime.nn.lora import LoraSlots
from runtime.nn.native import NativeDecode, rms_norm_kernel, silu_mul_kernel
from runtime.nn.quant import make_base_linear
from runtime.nn.rotary import Rotary, rotate


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            kernel = rms_norm_kernel() if x.device.type == "cpu" else None
            if kernel is not None and not (torch.is_grad_enabled() and x.requires_grad):
                return kernel(x, self.weight, self.eps)  # one pass in C++ (csrc/elementwise.cpp)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # autograd, CUDA
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """HF's formulation: normalise in fp32, cast back, then scale (what bf16 runs)."""
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class AdaptedLinear(nn.Module):
    """A frozen base projection plus optional multi-slot LoRA (`lora` is None until slots exist)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.lora: LoraSlots | None = None

    def forward(self, x: torch.Tensor, ab: AdapterBatch | None) -> torch.Tensor:
        return self.adapt(x, self.base(x), ab)

    def adapt(self, x: torch.Tensor, y: torch.Tensor, ab: AdapterBatch | None) -> torch.Tensor:
        """y = base(x), computed by the caller (alone or in a ProjectionGroup) -> y + adapters."""
        if ab is None or self.lora is None or not ab.has_lora:
            return y
        return self.lora(x, y, ab, self.base.bias)

    def swap_lora(self, slots: LoraSlots | None) -> LoraSlots | None:
        """Point this projection at other LoRA slots (a training job's, and back); returns the
        ones it had. Straight into `_modules`, which is where nn.Module's __setattr__ puts a
        module (or None over one) after its checks: those cost ~1 us a call, and a training
        slice on the serving base swaps every projection twice (runtime/training/slices.py)."""
        if "lora" not in self._modules:  # never given slots: a plain attribute, None
            old, self.lora = self.__dict__.get("lora"), slots
            return old
        old, self._modules["lora"] = self._modules["lora"], slots
        return old


class EmbeddingLoraSlots(nn.Module):
    """LoRA on the token embedding: `E[ids] + scale[s] * (A[s].T[ids] @ B[s].T)`."""

    def __init__(self, vocab: int, hidden: int, num_slots: int, max_rank: int, dtype, device=None):
        super().__init__()
        n = num_slots + 1
        self.A = nn.Parameter(torch.zeros(n, vocab, max_rank, dtype=dtype, device=device),
                              requires_grad=False)  # [S+1, vocab, r] (A transposed: rows by id)
        self.B = nn.Parameter(torch.zeros(n, hidden, max_rank, dtype=dtype, device=device),
                              requires_grad=False)  # [S+1, hidden, r]
        self.register_buffer("scale", torch.zeros(n, dtype=dtype, device=device))

    def set_slot(self, slot: int, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        r = A.shape[0]  # A: [r, vocab], B: [hidden, r]
        with torch.no_grad():
            self.reset_slot(slot)
            self.A[slot, :, :r].copy_(A.T)
            self.B[slot, :, :r].copy_(B)
            self.scale[slot] = scale

    def reset_slot(self, slot: int) -> None:
        with torch.no_grad():
            self.A[slot].zero_()
            self.B[slot].zero_()
            self.scale[slot] = 0

    def forward(self, ids: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        # ids, slots: [T] -> [T, hidden]
        a = self.A[slots, ids]  # [T, r]
        return torch.bmm(self.B[slots], a[:, :, None])[:, :, 0] * self.scale[slots][:, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, proj: dict[str, nn.Module]):
        super().__init__()
        self.cfg = cfg
        self.q_proj, self.k_proj = AdaptedLinear(proj["q_proj"]), AdaptedLinear(proj["k_proj"])
        self.v_proj, self.o_proj = AdaptedLinear(proj["v_proj"]), AdaptedLinear(proj["o_proj"])
        self.qkv = ProjectionGroup([self.q_proj, self.k_proj, self.v_proj])

    def forward(self, x, cos, sin, attn: AttentionBatch, layer: int, ab: AdapterBatch | None):
        c, T = self.cfg, x.shape[0]
        q, k, v = self.qkv(x, ab)
        q = q.view(T, c.num_heads, c.head_dim)  # [T, H, hd]
        k = k.view(T, c.num_kv_heads, c.head_dim)  # [T, H_kv, hd]
        v = v.view(T, c.num_kv_heads, c.head_dim)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = attend(attn, layer, q, k, v)  # [T, H, hd]
        return self.o_proj(out.reshape(T, c.q_dim), ab)


class MLP(nn.Module):
    def __init__(self, proj: dict[str, nn.Module]):
        super().__init__()
        self.gate_proj, self.up_proj = AdaptedLinear(proj["gate_proj"]), AdaptedLinear(proj["up_proj"])
        self.down_proj = AdaptedLinear(proj["down_proj"])
        self.gate_up = ProjectionGroup([self.gate_proj, self.up_proj])

    def forward(self, x, ab: AdapterBatch | None):
        gate, up = self.gate_up(x, ab)
        return self.down_proj(silu_mul(gate, up), ab)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: on CPU in fp32 without autograd one C++ pass (csrc/elementwise.cpp, what
    the C++ decode layers run, so both paths give the same bits); else two ATen ops."""
    if gate.dtype == torch.float32 and gate.device.type == "cpu" and gate.dim() == 2 and \
            not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        kernel = silu_mul_kernel()
        if kernel is not None:
            return kernel(gate, up)
    return F.silu(gate) * up


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], quant: QuantConfig, dtype):
        super().__init__()
        proj = {}
        for leaf in cfg.linear_shapes():
            parent = "mlp" if leaf.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
            w = weights.pop(f"{parent}.{leaf}.weight")
            b = weights.pop(f"{parent}.{leaf}.bias", None)
            proj[leaf] = make_base_linear(w, b, quant, dtype)
        self.self_attn = Attention(cfg, proj)
        self.mlp = MLP(proj)
        self.input_layernorm = RMSNorm(weights.pop("input_layernorm.weight").to(dtype), cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(
            weights.pop("post_attention_layernorm.weight").to(dtype), cfg.rms_norm_eps)

    def forward(self, x, cos, sin, attn: AttentionBatch, layer: int, ab: AdapterBatch | None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, layer, ab)
        return x + self.mlp(self.post_attention_layernorm(x), ab)


class _Body(nn.Module):
    """Holds `embed_tokens`, `layers`, `norm` under the HF name `model`."""

    def __init__(self, cfg, weights, quant, dtype):
        super().__init__()
        self.embed_tokens = nn.Embedding.from_pretrained(weights.pop("model.embed_tokens.weight").to(dtype))
        self.layers = nn.ModuleList()
        for i in range(cfg.num_layers):
            prefix = f"model.layers.{i}."
            own = {k[len(prefix):]: weights.pop(k) for k in [k for k in weights if k.startswith(prefix)]}
            self.layers.append(DecoderLayer(cfg, own, quant, dtype))
            if own:
                raise ValueError(f"unexpected tensors in layer {i}: {sorted(own)}")
        self.norm = RMSNorm(weights.pop("model.norm.weight").to(dtype), cfg.rms_norm_eps)


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor],
                 quant: QuantConfig | None = None, dtype: torch.dtype = torch.float32):
        """Build from an HF state dict (consumed). Decoder projections are quantized per `quant`."""
        super().__init__()
        quant = quant or QuantConfig()
        weights = dict(weights)
        self.cfg, self.quant, self.dtype = cfg, quant, dtype
        self.model = _Body(cfg, weights, quant, dtype)
        lm_head = weights.pop("lm_head.weight", None)
        if cfg.tie_word_embeddings or lm_head is None:
            self.lm_head_weight = self.model.embed_tokens.weight  # tied: one tensor
        else:
            self.lm_head_weight = nn.Parameter(lm_head.to(dtype), requires_grad=False)
        leftover = [k for k in weights if not k.endswith("rotary_emb.inv_freq")]
        if leftover:
            raise ValueError(f"unexpected tensors in the base model: {sorted(leftover)[:10]}")
        self.rotary = Rotary(cfg)
        self.head = LmHead(self.lm_head_weight)  # the output matmul's kernels (lm_head.py)
        self.kernels: dict[str, int] = {}  # kernel name -> projections running it
        self.head_kernel = str(dtype).removeprefix("torch.")
        self.native: NativeDecode | None = None  # KV-cache steps' layers in C++ (native.py)
        self.embed_lora: EmbeddingLoraSlots | None = None
        self.num_slots, self.max_rank = 0, 0
        self.lora_weight_dtype = dtype  # LoRA slots' A / B storage (allocate_lora_slots)
        self._linears = {n: m for n, m in self.named_modules() if isinstance(m, AdaptedLinear)}
        self.requires_grad_(False)

    # ---- adapter slots -----------------------------------------------------------------------
    def adapted_linears(self) -> dict[str, AdaptedLinear]:
        """Every decoder projection by its HF module name (`model.layers.0.mlp.up_proj`)."""
        return self._linears

    def allocate_lora_slots(self, num_slots: int, max_rank: int, targets: set[str] | None = None,
                            weight_dtype: torch.dtype | None = None) -> None:
        """Preallocate LoRA slot tensors on every projection (or the leaf names in `targets`);
        weight_dtype: A and B's storage (LoraSlots; None = the model's dtype)."""
        self.num_slots, self.max_rank = num_slots, max_rank
        self.lora_weight_dtype = weight_dtype or self.dtype
        dev = self.model.norm.weight.device
        for name, lin in self.adapted_linears().items():
            if targets is None or name.rsplit(".", 1)[-1] in targets:
                lin.lora = LoraSlots(lin.base.in_features, lin.base.out_features, num_slots,
                                     max_rank, self.dtype, dev, weight_dtype=self.lora_weight_dtype)
        if self.native is not None:
            self.native.attach_lora(self)

    def allocate_embedding_slots(self) -> None:
        """Embedding-LoRA tables ([S+1, vocab, r]) are large: made only once an adapter needs them."""
        self.embed_lora = EmbeddingLoraSlots(self.cfg.vocab_size, self.cfg.hidden_size, self.num_slots,
                                             self.max_rank, self.dtype, self.model.norm.weight.device)

    # ---- kernels (once, after loading: gpt-fast `convert_for_runtime`) -------------------------
    def use_kernels(self, nf4_kernel: str, approximate_head: bool = False) -> dict[str, int]:
        """Put every 4-bit projection on `nf4_kernel` (runtime/nn/kernels.py names), merge the
        projections that share an input where that kernel allows (runtime/nn/groups.py), and
        pick the lm_head's kernels (runtime/nn/lm_head.py: approximate_head = bf16 / int8 with
        the top candidates exact). Call after moving the model to its device. Returns what
        runs where, for the start-up line."""
        groups = [m for m in self.modules() if isinstance(m, ProjectionGroup)]
        for g in groups:
            g.unmerge()
        counts: dict[str, int] = {}
        for lin in self.adapted_linears().values():
            got = lin.base.use_kernel(nf4_kernel)
            counts[got] = counts.get(got, 0) + 1
        merged = sum(g.merge() for g in groups)  # q/k/v and gate/up as one matmul each (groups.py)
        if merged:
            counts["merged groups"] = merged
        self.kernels = counts
        self.head_kernel = self.head.use(approximate_head)
        self.native = NativeDecode.for_model(self)  # None where it does not apply (native.py)
        return counts

    # ---- forward -----------------------------------------------------------------------------
    def _embedding_lora(self, ab: AdapterBatch | None) -> bool:
        return ab is not None and ab.any_embedding and self.embed_lora is not None

    def embed(self, tokens: torch.Tensor, ab: AdapterBatch | None) -> torch.Tensor:
        x = self.model.embed_tokens(tokens)  # [T, hidden]
        if self._embedding_lora(ab):
            x = x + self.embed_lora(tokens, ab.token_slots).to(x.dtype)
        return x

    def forward(self, tokens: torch.Tensor | None, positions: torch.Tensor, attn: AttentionBatch,
                adapters: AdapterBatch | None = None, logits_rows: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, return_hidden: bool = False) -> torch.Tensor:
        """tokens/positions: [T] -> logits [len(logits_rows) or T, vocab].

        `inputs_embeds` [T, hidden] replaces the embedding lookup (virtual tokens in training).
        """
        attn.prepare(self.cfg.sliding_window)
        if self.native is not None and inputs_embeds is None and not return_hidden and \
                self.native.takes(attn, adapters) and not self._embedding_lora(adapters):
            logits = self.native.logits(tokens, positions, self.rotary, attn, adapters, logits_rows)
            if logits is not None:  # the whole step from C++ (native.py); None: the modules run it
                return logits
        x = self.embed(tokens, adapters) if inputs_embeds is None else inputs_embeds
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        if self.native is not None and self.native.takes(attn, adapters):
            x = self.native(x, cos, sin, attn, adapters)  # the same layers' ops, from C++
        else:
            for i, layer in enumerate(self.model.layers):
                x = layer(x, cos, sin, attn, i, adapters)
        if logits_rows is not None:
            x = x[logits_rows]
        x = self.model.norm(x)
        if return_hidden:
            return x
        return self.head(x)

    @torch.no_grad()
    def virtual_token_kv(self, embeds: torch.Tensor) -> torch.Tensor:
        """KV of N virtual-token embeddings at positions 0..N-1: [L, 2, H_kv, N, hd].

        Causal attention makes this the same for every request of a prompt-tuning adapter, so it
        is computed once at load and written in front of each request's own tokens.
        """
        n = embeds.shape[0]
        attn = AttentionBatch.without_cache([n])
        attn.capture = []
        self.forward(None, torch.arange(n, device=embeds.device), attn,
                     inputs_embeds=embeds.to(self.dtype), logits_rows=torch.tensor([n - 1]))
        k = torch.stack([k for k, _ in attn.capture])  # [L, N, H_kv, hd]
        v = torch.stack([v for _, v in attn.capture])
        return torch.stack([k, v], dim=1).permute(0, 1, 3, 2, 4).contiguous()  # [L, 2, H_kv, N, hd]

    def base_bytes(self) -> dict[str, int]:
        """Resident bytes of the base: quantized projections (codes, statistics, the fused
        layout's bf16 absmax), everything else, and the lm_head's kernel copies (int8 / bf16)."""
        proj = sum(lin.base.resident_bytes() for lin in self.adapted_linears().values())
        other = sum(p.numel() * p.element_size() for n, p in self.named_parameters()
                    if ".lora." not in n and not n.startswith("embed_lora"))
        return {"projections": proj, "other": other, "lm_head_copies": self.head.copy_bytes()}
