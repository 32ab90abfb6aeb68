"""Quiver's side of the parity tests: our decoder, registry and engine over the same tiny HF base.

    hf = make_tiny_model("llama")
    q = QuiverStack.from_hf(hf, quant="none", slots=8)
    q.load("a", adapter_dir)                  # read_adapter + registry.add
    logits = q.logits(ids, "a")               # one row, through the KV-cache path
    texts = q.engine().generate([...])
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.adapters.peft_format import read_adapter
from runtime.adapters.registry import AdapterRegistry
from runtime.config import ModelConfig, QuantConfig
from runtime.engine.engine import Engine, EngineConfig
from runtime.engine.params import StoppingParams
from runtime.engine.request import GenerationRequest
from runtime.nn.adapter_batch import AdapterBatch
from runtime.nn.attention import AttentionBatch
from runtime.nn.kv_cache import KVCache, SeqCache
from runtime.nn.model import DecoderModel


@dataclass
class QuiverStack:
    model: DecoderModel
    registry: AdapterRegistry
    cfg: ModelConfig

    @classmethod
    def from_hf(cls, hf, quant: str = "none", slots: int = 8, max_rank: int = 16,
                kernel: str = "standard") -> "QuiverStack":
        """kernel: the 4-bit kernel (runtime/nn/kernels.py) the projections run on; a parity
        test puts Quiver on the path its reference takes (`bnb_reference_kernel`)."""
        cfg = ModelConfig.from_hf_dict(hf.config.to_dict())
        model = DecoderModel(cfg, hf.state_dict(), QuantConfig(quant))
        model.use_kernels(kernel)
        return cls(model, AdapterRegistry(model, slots, max_rank), cfg)

    def load(self, adapter_id: str, path: Path) -> None:
        self.registry.add(adapter_id, read_adapter(path, self.cfg, max_rank=self.registry.max_rank))

    @torch.no_grad()
    def batch_logits(self, rows: list[tuple[torch.Tensor, str]], force_path: str | None = None,
                     with_path: bool = False):
        """One packed prefill over the KV-cache path on the model's device; row i: (ids [L],
        adapter id or ""). Returns per-row logits [L, V] for the row's own tokens (not the
        adapter's prefix), on the CPU in fp32; with_path: (logits, the LoRA path taken)."""
        dev = self.model.model.norm.weight.device
        cache = KVCache(self.cfg, max_tokens=8192, block_size=4, dtype=self.model.dtype, device=dev)
        seqs, slots = [], []
        for _, adapter_id in rows:
            seq, slot = SeqCache(), self.registry.none_slot
            if adapter_id:
                slot, state = self.registry.acquire(adapter_id)
                if state.kv_prefix is not None:
                    cache.write_prefix(seq, state.kv_prefix)
            seqs.append(seq)
            slots.append(slot)
        q_lens = [len(ids) for ids, _ in rows]
        for seq, n in zip(seqs, q_lens):
            cache.reserve(seq, n)
        attn = AttentionBatch.with_cache(cache, seqs, q_lens)
        lora, dora, emb = self.registry.slot_sets()
        ab = AdapterBatch.build(slots, q_lens, self.registry.none_slot, lora_slots=lora,
                                dora_slots=dora, embedding_slots=emb, device=dev, force_path=force_path)
        tokens = torch.cat([ids for ids, _ in rows]).to(dev)
        positions = torch.cat([torch.arange(s.length, s.length + n) for s, n in zip(seqs, q_lens)]).to(dev)
        try:
            logits = self.model(tokens, positions, attn, ab).float().cpu()
        finally:
            for _, adapter_id in rows:
                if adapter_id:
                    self.registry.release(adapter_id)
        out = list(logits.split(q_lens))
        return (out, ab.path) if with_path else out

    def logits(self, ids: torch.Tensor, adapter_id: str = "") -> torch.Tensor:
        return self.batch_logits([(ids, adapter_id)])[0]

    def engine(self, tokenizer, **kw) -> Engine:
        return Engine(self.model, tokenizer, self.registry, EngineConfig(**kw))

    def greedy(self, engine: Engine, prompts: list[tuple[list[int], str]], n: int = 20) -> list[list[int]]:
        reqs = [GenerationRequest(list(ids), adapter_id=a,
                                  stopping=StoppingParams(max_new_tokens=n, ignore_eos=True))
                for ids, a in prompts]
        return [c.token_ids for c in engine.generate(reqs)]


def peft_logits(peft_model, ids: torch.Tensor) -> torch.Tensor:
    """PEFT's forward on one row; for prompt tuning / p-tuning the virtual-token rows are cut."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = peft_model(input_ids=ids[None]).logits[0]
    return out[-len(ids):]


def peft_greedy(peft_model, ids: list[int], n: int = 20) -> list[int]:
    """A manual greedy loop over PEFT's forward without cache (its generate() is wrong for prompt
    learning with transformers 5, peft-format.md)."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(peft_logits(peft_model, torch.tensor(seq))[-1].argmax()))
    return seq[len(ids):]


def bnb_reference_kernel() -> str:
    """The 4-bit path transformers' `Linear4bit` takes on this machine in eval mode without
    gradients: bitsandbytes' fused kernel on CPUs with AVX512-BF16 (it repacks its weight on the
    first such call), the standard dequantize + matmul path on other CPUs. A parity test runs
    Quiver on the same kernel, so both sides compute the same thing on any CI machine."""
    from runtime.nn.kernels import cpu_has_fused_nf4

    return "cpu-fused" if cpu_has_fused_nf4() else "standard"


def bnb_base(hf, repack: bool = True):
    """The same tiny base loaded by transformers with the QLoRA BitsAndBytesConfig (fp32 compute).

    repack=False keeps every `Linear4bit` on the standard layout (no fused kernel): PEFT's DoRA
    reads the weight's bytes as the standard layout to compute its norms, so a DoRA reference on
    an AVX512-BF16 CPU is only right with repacking off (docs: peft-format.md). Quiver's side
    then runs kernel "standard" too.
    """
    import tempfile

    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    with tempfile.TemporaryDirectory() as d:
        copy.deepcopy(hf).save_pretrained(d)
        model = AutoModelForCausalLM.from_pretrained(d, quantization_config=cfg, device_map="cpu",
                                                     dtype=torch.float32).eval()
    for m in model.modules():
        if isinstance(m, Linear4bit) and not repack:
            m.support_avx512bf16_for_cpu = False
    return model
