"""Loading a base model's files: the embedded default (converted once from GGUF) or a local
Hugging Face directory. The nn modules that consume these tensors live in runtime/nn."""
from runtime.models.embedded import (
    EMBEDDED_MODEL_NAME,
    EmbeddedModelUnavailableError,
    embedded_model_dir,
    find_embedded_gguf,
    quiver_home,
)
from runtime.models.hf import (
    ModelFilesError,
    expected_shapes,
    load_model_config,
    load_state_dict,
    load_tokenizer,
    resolve_model_dir,
)

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "EmbeddedModelUnavailableError",
    "ModelFilesError",
    "embedded_model_dir",
    "expected_shapes",
    "find_embedded_gguf",
    "load_model_config",
    "load_state_dict",
    "load_tokenizer",
    "quiver_home",
    "resolve_model_dir",
]
