"""PEFT LORA and ADALORA tensors -> Quiver's LoraModule / LoraEmbedding (see peft_format.py).

    LORA      <module>.lora_A.weight [r, in]     <module>.lora_B.weight [out, r]
              <module>.lora_B.bias [out]         (lora_bias)
              <module>.lora_magnitude_vector [out]   (use_dora)
              model.embed_tokens.lora_embedding_A [r, vocab], .lora_embedding_B [hidden, r]
              model.embed_tokens.base_layer.weight [vocab, hidden]   (a copy of the base's)
    ADALORA   <module>.lora_A [k, in]   <module>.lora_B [out, k]   <module>.lora_E [k, 1]

AdaLoRA is an SVD-shaped LoRA, `delta = B @ diag(E) @ A * alpha / (init_r + 1e-5)`, whose rank
allocator prunes singular values during training. `rank_pattern["<module>.lora_E"]` holds init_r
booleans and only the True rows are saved, so k = the True count, and k = 0 is legal. At load it
folds into plain LoRA: A' = A * E, B' = B, scale = alpha / (init_r + 1e-5). A module pruned to
k = 0 contributes exactly nothing and is left out of `Adapter.lora`.
"""
from __future__ import annotations

from typing import Any

from runtime.adapters.matching import EMBEDDING_NAME, lora_target_names, module_rank, module_scale
from runtime.adapters.peft_checks import (
    KEY_PREFIX,
    check_config_rank,
    check_keys,
    check_max_rank,
    positive_int,
    reject_fields,
    shaped,
)
from runtime.adapters.types import Adapter, AdapterFormatError, AdapterKind, LoraEmbedding, LoraModule
from runtime.config import ModelConfig

#: LoRA / AdaLoRA config fields that change the forward in ways Quiver does not implement, with
#: the value that means "off". A missing field, null, [] or {} also count as off. Fields that only
#: affect training or init (lora_dropout, velora_config, eva_config, ...) are accepted.
UNSUPPORTED_LORA_FIELDS: dict[str, Any] = {
    "modules_to_save": None,  # full copies of whole modules (e.g. lm_head) trained alongside
    "trainable_token_indices": None,  # per-token embedding rows (TrainableTokens)
    "layer_replication": None,  # a deeper layer stack built from the base layers
    "alora_invocation_tokens": None,  # aLoRA: delta active only after the invocation tokens
    "fan_in_fan_out": False,  # weights stored [in, out] (GPT-2 Conv1D); Llama has nn.Linear
    "bias": "none",  # base-layer biases trained and saved ("all" / "lora_only")
    "use_qalora": False,  # QALoRA pools the input before A (GPTQ bases only)
    "target_parameters": None,  # LoRA on raw nn.Parameters (MoE experts)
    "monteclora_config": None,  # Monte Carlo sampled LoRA
    "use_bdlora": None,  # block-diagonal LoRA factors
    "arrow_config": None,  # routing between several LoRA experts
    "kasa_config": None,  # truncates the base weight, adds a learnable diagonal
}
#: init_lora_weights values whose adapter only works on a base whose weights PEFT modified at
#: init (PiSSA/OLoRA/CorDA/LoRA-GA subtract the initial delta, LoftQ re-quantizes). PEFT resets
#: the saved value to true when it converts such an adapter to plain LoRA.
BASE_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


def read_lora(config: dict, tensors: dict, model: ModelConfig, *, max_rank: int, **_: Any) -> Adapter:
    """LORA (incl. DoRA, rsLoRA, rank/alpha patterns, lora_bias, embed_tokens) and ADALORA."""
    is_adalora = config["peft_type"] == "ADALORA"
    reject_fields(config, UNSUPPORTED_LORA_FIELDS)
    _reject_base_mutating_init(config)
    targets = lora_target_names(config, model)
    _check_options(config, targets, model)
    check_keys(tensors, *_keys(config, targets))
    base_embedding = f"{KEY_PREFIX}{EMBEDDING_NAME}.base_layer.weight"
    if base_embedding in tensors:
        # PEFT also saves the base embedding it wrapped (`save_embedding_layers="auto"`): a copy of
        # the base model's own embedding, which Quiver already holds. Only its shape is checked;
        # the tensor is dropped (a resized vocabulary fails this check).
        base_shape = (model.vocab_size, model.hidden_size)
        shaped(tensors, base_embedding, base_shape, "the base embedding [vocab, hidden]")
    masks = _adalora_masks(config, targets) if is_adalora else {}
    adapter = Adapter(peft_type=config["peft_type"], kind=AdapterKind.LORA, config=config,
                      use_dora=bool(config.get("use_dora", False)))
    for name in targets:
        if name == EMBEDDING_NAME:
            adapter.embedding = _embedding(config, tensors, model, max_rank)
        elif is_adalora:
            module = _adalora_module(config, tensors, model, name, masks.get(name), max_rank)
            if module is not None:  # pruned to rank 0: contributes nothing, so it is dropped
                adapter.lora[name] = module
        else:
            adapter.lora[name] = _lora_module(config, tensors, model, name, max_rank)
    return adapter


def _reject_base_mutating_init(config: dict) -> None:
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS):
        raise AdapterFormatError(
            f"adapter was initialised with init_lora_weights={init!r}, which modifies the base weights, "
            "so it only works on that modified base. Convert it to plain LoRA with PEFT: "
            "save_pretrained(..., path_initial_model_for_weight_conversion=...)"
        )


def _check_options(config: dict, targets: list[str], model: ModelConfig) -> None:
    use_dora, lora_bias = bool(config.get("use_dora", False)), bool(config.get("lora_bias", False))
    if use_dora and (config["peft_type"] == "ADALORA" or lora_bias):
        raise AdapterFormatError(
            "use_dora=True cannot be combined with AdaLoRA or lora_bias (PEFT rejects it too)"
        )
    if EMBEDDING_NAME not in targets:
        return
    if config["peft_type"] == "ADALORA":
        raise AdapterFormatError(
            "AdaLoRA on embed_tokens is not supported (PEFT's AdaLoRA adapts linear layers only)"
        )
    if use_dora:
        raise AdapterFormatError(
            "DoRA on embed_tokens is not supported by Quiver (DoRA works on the projections)"
        )
    if lora_bias:
        raise AdapterFormatError("lora_bias=True on embed_tokens is not supported (PEFT rejects it too)")
    if config.get("ensure_weight_tying", False) and model.tie_word_embeddings:
        raise AdapterFormatError(
            "ensure_weight_tying=True with LoRA on embed_tokens of a base with tied embeddings also "
            "adapts lm_head, which Quiver does not support"
        )


def _keys(config: dict, targets: list[str]) -> tuple[set[str], set[str]]:
    """(required, optional) tensor keys for these targets."""
    if config["peft_type"] == "ADALORA":
        leaves = ["lora_A", "lora_B", "lora_E"]
    else:
        leaves = ["lora_A.weight", "lora_B.weight"]
        leaves += ["lora_B.bias"] * bool(config.get("lora_bias", False))
        leaves += ["lora_magnitude_vector"] * bool(config.get("use_dora", False))
    expected, optional = set(), set()
    for name in targets:
        if name == EMBEDDING_NAME:
            expected |= {f"{KEY_PREFIX}{name}.lora_embedding_A", f"{KEY_PREFIX}{name}.lora_embedding_B"}
            optional.add(f"{KEY_PREFIX}{name}.base_layer.weight")
        else:
            expected |= {f"{KEY_PREFIX}{name}.{leaf}" for leaf in leaves}
    return expected, optional


def _lora_module(config: dict, tensors: dict, model: ModelConfig, name: str, max_rank: int) -> LoraModule:
    in_f, out_f = model.linear_shapes()[name.rsplit(".", 1)[-1]]
    r = module_rank(config, name)
    if r <= 0:
        raise AdapterFormatError(f"{name}: LoRA rank r must be positive, got {r}")
    key = f"{KEY_PREFIX}{name}"
    check_config_rank(tensors, name, "lora_A.weight", f"r={r} (from r / rank_pattern, where the first "
                      "matching key in file order wins; PEFT saves keys sorted)", r)
    A = shaped(tensors, f"{key}.lora_A.weight", (r, in_f), f"[r, in]: r={r}, in={in_f}")  # [r, in]
    B = shaped(tensors, f"{key}.lora_B.weight", (out_f, r), f"[out, r]: out={out_f}, r={r}")  # [out, r]
    check_max_rank(name, r, max_rank)
    bias = magnitude = None
    if config.get("lora_bias", False):
        bias = shaped(tensors, f"{key}.lora_B.bias", (out_f,), f"[out]: out={out_f}")  # [out]
    if config.get("use_dora", False):
        magnitude = shaped(tensors, f"{key}.lora_magnitude_vector", (out_f,), f"[out]: out={out_f}")  # [out]
    return LoraModule(A=A, B=B, scale=module_scale(config, name, r), bias=bias, magnitude=magnitude)


def _embedding(config: dict, tensors: dict, model: ModelConfig, max_rank: int) -> LoraEmbedding:
    r = module_rank(config, EMBEDDING_NAME)
    key = f"{KEY_PREFIX}{EMBEDDING_NAME}"
    vocab, hidden = model.vocab_size, model.hidden_size
    check_config_rank(tensors, EMBEDDING_NAME, "lora_embedding_A", f"r={r} (from r / rank_pattern)", r)
    A = shaped(tensors, f"{key}.lora_embedding_A", (r, vocab), f"[r, vocab]: vocab={vocab}")  # [r, vocab]
    B = shaped(tensors, f"{key}.lora_embedding_B", (hidden, r), f"[hidden, r]: hidden={hidden}")  # [h, r]
    check_max_rank(EMBEDDING_NAME, r, max_rank)
    return LoraEmbedding(A=A, B=B, scale=module_scale(config, EMBEDDING_NAME, r))


def _adalora_module(
    config: dict, tensors: dict, model: ModelConfig, name: str, mask: list[bool] | None, max_rank: int
) -> LoraModule | None:
    """Fold AdaLoRA's SVD form `B @ diag(E) @ A` into LoRA form `B @ A'` with A' = A * E.

    mask: the module's `rank_pattern` entry (None: not pruned, k = init_r). Returns None for k = 0.
    """
    in_f, out_f = model.linear_shapes()[name.rsplit(".", 1)[-1]]
    k = positive_int(config, "init_r", 12) if mask is None else sum(mask)
    key = f"{KEY_PREFIX}{name}"
    why = "init_r, no rank_pattern entry" if mask is None else "the True entries of its rank_pattern mask"
    check_config_rank(tensors, name, "lora_A", f"k={k} ({why})", k)
    A = shaped(tensors, f"{key}.lora_A", (k, in_f), f"[k, in]: k={k} kept ranks, in={in_f}")  # [k, in]
    B = shaped(tensors, f"{key}.lora_B", (out_f, k), f"[out, k]: out={out_f}, k={k}")  # [out, k]
    E = shaped(tensors, f"{key}.lora_E", (k, 1), f"[k, 1]: k={k}")  # [k, 1]
    if k == 0:
        return None
    check_max_rank(name, k, max_rank)
    return LoraModule(A=A * E, B=B, scale=module_scale(config, name, k))  # A * E: [k, in]


def _adalora_masks(config: dict, targets: list[str]) -> dict[str, list[bool]]:
    """AdaLoRA's `rank_pattern` by module: `init_r` booleans, True = rank kept (saved)."""
    init_r = positive_int(config, "init_r", 12)
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise AdapterFormatError(f"AdaLoRA rank_pattern must be a JSON object, not {type(pattern).__name__}")
    masks = {}
    for key, mask in pattern.items():
        # Keys are `<module>.lora_E`; in memory PEFT adds the adapter name (`.lora_E.default`).
        name = key.replace(".default", "").removesuffix(".lora_E")
        if name not in targets:
            raise AdapterFormatError(
                f"AdaLoRA rank_pattern names {key!r}, a module the config does not target"
            )
        if not isinstance(mask, list) or len(mask) != init_r or not all(isinstance(b, bool) for b in mask):
            raise AdapterFormatError(
                f"AdaLoRA rank_pattern[{key!r}] must be a list of {init_r} (init_r) booleans, got {mask!r}"
            )
        masks[name] = mask
    return masks
