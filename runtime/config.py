"""Plain settings objects for the model, the engine and the server.

No torch import here: the CLI, the server edge and the trainer read these before any heavy
import, and they serialise (names, not classes).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: HF `model_type` values whose decoder layer is the Llama shape Quiver implements
#: (RMSNorm, rotary, grouped-query attention, SwiGLU MLP; Qwen2 adds q/k/v bias).
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")

#: Rotary scaling types whose frequency table is fixed at load time (runtime/nn/rotary.py).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

#: `--adapter-dtype` choices: how LoRA slot weights are stored (runtime/nn/lora.py LoraSlots)
ADAPTER_DTYPES = ("float32", "bfloat16")


class UnsupportedModelError(ValueError):
    """The base model directory holds something Quiver cannot run; the message says what."""


@dataclass
class ModelConfig:
    """The shape of a Llama-family decoder, read from an HF `config.json`."""

    architecture: str  # HF model_type: llama | mistral | qwen2
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    #: Bias on the q/k/v projections: always in Qwen2; in Llama when its config says so, and then
    #: on o_proj too (see `o_proj_bias`). Mistral has none.
    attention_bias: bool = False
    mlp_bias: bool = False  # bias on gate/up/down (Llama's `mlp_bias`; never in Mistral/Qwen2)
    rope_theta: float = 10000.0
    #: HF rope scaling parameters (`rope_scaling` in transformers 4, `rope_parameters` in 5),
    #: normalised so that `rope_type` is always present.
    rope_scaling: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default"})
    sliding_window: int | None = None  # Mistral: attend to the last N keys only
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    name: str = ""  # where the base came from (a path or the embedded model's name)

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.architecture!r}: Quiver runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama-family) models"
            )
        rope_type = self.rope_scaling.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"unsupported rope scaling type {rope_type!r}: supported are "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        self.eos_token_ids = tuple(self.eos_token_ids)

    def with_stop_ids(self, *more: Any) -> "ModelConfig":
        """This config with extra end-of-sequence ids (ints, lists or None) added, order kept."""
        ids = list(self.eos_token_ids)
        for m in more:
            ids += [i for i in token_ids(m) if i not in ids]
        return dataclasses.replace(self, eos_token_ids=tuple(ids))

    @property
    def kv_dim(self) -> int:
        """Width of one key (or value) row over all KV heads."""
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def o_proj_bias(self) -> bool:
        """Llama's `attention_bias` also puts a bias on o_proj; Qwen2's q/k/v bias does not."""
        return self.attention_bias and self.architecture == "llama"

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each per-layer projection, keyed by HF leaf name."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_module_names(self) -> list[str]:
        """Full HF module names of every decoder projection, e.g. `model.layers.0.self_attn.q_proj`."""
        names = []
        for layer in range(self.num_layers):
            for leaf in self.linear_shapes():
                parent = "self_attn" if leaf in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                names.append(f"model.layers.{layer}.{parent}.{leaf}")
        return names

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str = "") -> "ModelConfig":
        """Read an HF config.json dict (transformers 4 or 5 spelling)."""
        arch = d.get("model_type", "")
        if arch not in SUPPORTED_ARCHITECTURES:
            archs = d.get("architectures") or [arch]
            raise UnsupportedModelError(
                f"unsupported architecture {arch!r} ({', '.join(map(str, archs))}): Quiver runs "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama-family) models"
            )
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        # transformers 5 keeps rope_theta inside rope_parameters; 4 kept it top-level (and 5's
        # to_dict() writes a top-level `"rope_theta": null`, so `or` rather than a .get default).
        rope_theta = float(rope.pop("rope_theta", None) or d.get("rope_theta") or 10000.0)
        rope.setdefault("rope_type", rope.pop("type", "default"))
        num_heads = d["num_attention_heads"]
        eos_ids = token_ids(d.get("eos_token_id"))
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            # transformers hard-codes these per class: Qwen2 always has q/k/v bias, Mistral never
            # has any bias, only Llama reads `attention_bias` / `mlp_bias` from its config.
            attention_bias=arch == "qwen2" or (arch == "llama" and bool(d.get("attention_bias"))),
            mlp_bias=arch == "llama" and bool(d.get("mlp_bias")),
            rope_theta=rope_theta,
            rope_scaling=rope,
            sliding_window=_sliding_window(d, arch),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=d.get("pad_token_id"),
            name=name,
        )


def _sliding_window(d: dict[str, Any], arch: str) -> int | None:
    """The one attention window every layer uses, as transformers 5 reads the config.

    Mistral slides every layer when `sliding_window` is set (its class default is 4096 when the
    key is absent; Mistral v0.2+ writes null). Qwen2 slides only when `use_sliding_window`, and
    then only layers >= `max_window_layers` (or as `layer_types` lists): a mix of full and
    sliding layers is refused, since ModelConfig carries one window for all layers.
    """
    if arch == "mistral":
        return d.get("sliding_window", 4096)
    if arch != "qwen2":
        return None
    window = d.get("sliding_window") if d.get("use_sliding_window") else None
    num_layers = d["num_hidden_layers"]
    first_sliding = d.get("max_window_layers", 28)
    layer_types = d.get("layer_types") or [
        "sliding_attention" if window is not None and i >= first_sliding else "full_attention"
        for i in range(num_layers)
    ]
    if "sliding_attention" not in layer_types:
        return None
    if "full_attention" in layer_types:
        raise UnsupportedModelError(
            f"this qwen2 model mixes full-attention and sliding-window layers (sliding_window="
            f"{window}, max_window_layers={first_sliding}); Quiver applies one window to every "
            "layer"
        )
    return window


@dataclass
class QuantConfig:
    """How the base model's decoder projections are stored (QLoRA recipe by default)."""

    method: str = "nf4"  # nf4 | fp4 | none
    double_quant: bool = True
    blocksize: int = 64

    def __post_init__(self) -> None:
        if self.method not in ("nf4", "fp4", "none"):
            raise ValueError(f"--quantize must be nf4, fp4 or none, not {self.method!r}")


@dataclass
class ServerConfig:
    """Everything `quiver serve` is told (runtime/server/serve_cli.py maps flags 1:1 onto this)."""

    # ---- base model
    model: str | None = None  # HF directory; None = the embedded SmolLM2-135M-Instruct
    quantize: str = "nf4"  # nf4 | fp4 | none
    dtype: str | None = None  # None = auto: measured per part (runtime/models/base.py Precision)
    device: str = "auto"
    nf4_kernel: str = "auto"  # auto | cpu-fused | cpu-gemv | standard (runtime/nn/kernels.py)
    threads: int | None = None  # torch intra-op threads; None = the cores torch sees
    # ---- network
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8033  # gRPC; 0 = any free port
    metrics_port: int | None = 9090  # Prometheus /metrics; None = off, 0 = any free port
    grpc_workers: int = 256  # concurrent RPCs served; beyond it gRPC answers RESOURCE_EXHAUSTED
    #: OpenAI-compatible HTTP (runtime/server/http); None = off, 0 = any free port. Off here so
    #: an embedded server opens no port it was not asked for; `quiver serve` defaults to 8000.
    http_port: int | None = None
    served_model_name: str | None = None  # the base model's `model` id on HTTP; None = its name
    # ---- adapters
    adapter_dir: str | None = None  # lazy loading of <adapter-dir>/<id>; a LoadAdapter root
    allow_adapter_roots: list[str] = field(default_factory=list)  # more LoadAdapter source roots
    preload: list[str] = field(default_factory=list)  # ids loaded from adapter_dir at start-up
    max_device_adapters: int = 16  # device slots
    max_lora_rank: int = 16  # slot rank: larger LoRA ranks are refused at load
    #: LoRA slot weights' storage: None = the activations' dtype (fp32 on CPU: PEFT's own, exact);
    #: "bfloat16" halves the bytes a many-adapter decode step streams (math stays fp32; each
    #: weight is rounded to bf16 once at load, which loses nothing for adapters saved in bf16)
    adapter_dtype: str | None = None
    adapter_load_timeout_s: float = 120.0  # a request waiting on a lazy load gives up after this
    #: a store every replica shares (runtime/adapters/s3_store.py): s3://bucket/prefix, read into
    #: adapter_cache_dir; a plain directory here is the same as adapter_dir
    adapter_store: str | None = None
    adapter_cache_dir: str | None = None  # None = $QUIVER_HOME/adapter-cache/<bucket>/<prefix>
    s3_endpoint_url: str | None = None  # None = AWS_ENDPOINT_URL(_S3) or AWS itself
    # ---- engine
    max_batch_tokens: int = 512
    max_running: int = 64
    kv_cache_tokens: int = 32768
    #: automatic prefix caching: a prompt's full KV blocks are reused by later requests of the
    #: same adapter with the same leading tokens (runtime/nn/kv_cache.py)
    prefix_cache: bool = True
    bind_threads: bool = False  # pin the engine's OpenMP team one thread per CPU (kernels.bind_threads)
    #: allocate the whole KV budget at start-up instead of doubling up to it as traffic grows:
    #: resident memory then stays where it starts (the soak's memory check)
    kv_preallocate: bool = False
    max_queue: int = 512  # waiting requests; beyond it Generate is RESOURCE_EXHAUSTED
    max_new_tokens: int = 4096  # cap per request
    # ---- fine-tuning jobs (runtime/training; README "Fine-tuning in the server")
    #: files, job state (SQLite) and checkpoints; None = the fine-tuning routes are off (an
    #: embedded server writes nowhere it was not told to); `quiver serve` defaults it under
    #: $QUIVER_HOME
    data_dir: str | None = None
    train_share: float = 0.3  # at most this share of engine time trains while requests wait
    max_file_bytes: int = 64 * 1024 * 1024  # one uploaded training file
    max_file_rows: int = 100_000
    max_train_epochs: int = 50
    max_train_seq_len: int = 2048
    # ---- lifecycle and metrics
    grace_period_s: float = 30.0  # SIGTERM: in-flight requests get this long to finish
    metrics_max_adapter_labels: int = 64
    # ---- security and limits (README "Security and limits"; runtime/server/auth.py, tls.py)
    #: bearer token the Adapters service requires; None: open on a loopback bind, closed otherwise.
    #: repr=False: a config printed or logged never shows a secret.
    admin_token: str | None = field(default=None, repr=False)
    api_token: str | None = field(default=None, repr=False)  # Generation's token; None = open
    tls_cert: str | None = None  # PEM certificate chain; with tls_key: TLS on the gRPC port
    tls_key: str | None = None  # PEM private key
    tls_client_ca: str | None = None  # PEM CA bundle: client certificates are then required (mTLS)
    max_message_bytes: int = 4 * 1024 * 1024  # largest request accepted (RESOURCE_EXHAUSTED beyond)
    max_input_chars: int = 262_144  # prompt text (or chat contents together), before tokenizing

    def __post_init__(self) -> None:
        QuantConfig(self.quantize)  # validates the name
        for name in ("max_device_adapters", "max_lora_rank", "max_batch_tokens", "max_running",
                     "kv_cache_tokens", "max_new_tokens", "grpc_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError("--threads must be >= 1")
        if self.max_queue < 0 or self.grace_period_s < 0:
            raise ValueError("--max-queue and --grace-period must be >= 0")
        if not 0.0 < self.train_share <= 1.0:
            raise ValueError("--train-share must be in (0, 1]")
        for name in ("max_file_bytes", "max_file_rows", "max_train_epochs", "max_train_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.adapter_dtype not in (None, *ADAPTER_DTYPES):
            raise ValueError(f"--adapter-dtype must be one of {', '.join(ADAPTER_DTYPES)}, "
                             f"not {self.adapter_dtype!r}")
        self._check_store()
        self._check_security()

    def _check_store(self) -> None:
        if self.adapter_store and not self.adapter_store.startswith("s3://"):
            if self.adapter_dir and self.adapter_dir != self.adapter_store:
                raise ValueError("--adapter-store DIR and --adapter-dir name the same thing; give one")
            self.adapter_dir = self.adapter_store
        elif self.adapter_store and self.adapter_dir:
            raise ValueError("--adapter-store s3://... keeps its local copies in --adapter-cache-dir; "
                             "drop --adapter-dir")
        if self.preload and not (self.adapter_dir or self.adapter_store):
            raise ValueError("--preload needs --adapter-dir (ids are read from <adapter-dir>/<id>)")

    @property
    def remote_store(self) -> bool:
        """Adapters come from an object store shared with other servers (s3://)."""
        return bool(self.adapter_store) and self.adapter_store.startswith("s3://")

    def _check_security(self) -> None:
        # An empty token (an unset environment variable expanded to "") means "no token", never
        # "the empty string is the password".
        self.admin_token = self.admin_token or None
        self.api_token = self.api_token or None
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together: give both, or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
        for name in ("max_message_bytes", "max_input_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")


def token_ids(value: Any) -> tuple[int, ...]:
    """An HF `eos_token_id` field (an int, a list of ints, or null) as a tuple."""
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)
