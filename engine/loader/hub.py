"""Where a model's files are: a local directory or GGUF file, a Hugging Face hub id (downloaded once into the cache
that HF_HOME / HF_HUB_CACHE / `download_dir` name, from HF_ENDPOINT), or `modelscope:<id>`."""

from __future__ import annotations

import fnmatch
import importlib.util
import os
from pathlib import Path

from vdeploy_engine import progress
from vdeploy_engine.loader.errors import ModelLoadError

MODELSCOPE_PREFIX = "modelscope:"
# Enough to build the model and its tokenizer; weights are picked separately (safetensors when the repo has them).
_METADATA_PATTERNS = ["*.json", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".gguf"


def resolve_model(model: str, revision: str | None = None, download_dir: str | None = None) -> Path:
    """The local path holding `model`'s files, downloading them first for a hub id."""
    if model.startswith(MODELSCOPE_PREFIX):
        return _from_modelscope(model[len(MODELSCOPE_PREFIX) :], revision, download_dir)
    path = Path(model).expanduser()
    if path.exists():
        return path
    if _looks_like_path(model):
        raise ModelLoadError(f"model {model!r}: no such file or directory")
    return _from_hf_hub(model, revision, download_dir)


def _looks_like_path(model: str) -> bool:
    """A hub id is `name` or `org/name`; anything else that does not exist locally is a missing path."""
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or model.lower().endswith(".gguf")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hf_cache_dir(download_dir: str | None) -> str | None:
    # huggingface_hub reads HF_HOME once, at import; read it per call so a changed environment is honoured.
    if download_dir:
        return download_dir
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _from_hf_hub(model_id: str, revision: str | None, download_dir: str | None) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import disable_progress_bars

    if progress.reporting_events():
        disable_progress_bars()  # `pulling` events say it; bars would only fill the replica's log
    endpoint = os.environ.get("HF_ENDPOINT") or None
    cache_dir = _hf_cache_dir(download_dir)

    def from_cache() -> str:
        return snapshot_download(model_id, revision=revision, cache_dir=cache_dir, local_files_only=True)

    if _env_flag("HF_HUB_OFFLINE"):
        try:
            return Path(from_cache())
        except Exception as exc:
            raise _hub_error(model_id, "the local cache (HF_HUB_OFFLINE is set)", exc) from None
    try:
        sizes = {f.path: f.size for f in HfApi(endpoint=endpoint).list_repo_tree(model_id, revision=revision,
                                                                                 recursive=True) if hasattr(f, "size")}
        weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in sizes) else ["*.bin"]
        patterns = _METADATA_PATTERNS + weights
        total = sum(size for name, size in sizes.items() if any(fnmatch.fnmatch(name, p) for p in patterns))
        blobs = _repo_cache(model_id, cache_dir) / "blobs"
        with progress.watch("pulling", total, "B", f"Pulling {model_id}", lambda: min(_bytes_under(blobs), total)):
            return Path(
                snapshot_download(
                    model_id, revision=revision, cache_dir=cache_dir, endpoint=endpoint, allow_patterns=patterns
                )
            )
    except Exception as exc:  # network, auth, missing repo: a copy already in the cache still serves
        try:
            return Path(from_cache())
        except Exception:
            raise _hub_error(model_id, endpoint or "the Hugging Face hub", exc) from None


def _repo_cache(model_id: str, cache_dir: str | None) -> Path:
    """The folder huggingface_hub keeps `model_id` in (its blobs hold the bytes, partial downloads included)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=model_id, repo_type="model")


def _bytes_under(folder: Path) -> int:
    try:
        return sum(f.stat().st_size for f in folder.iterdir())
    except OSError:  # not created yet, or a file renamed while we looked
        return 0


def _hub_error(model_id: str, where: str, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"model {model_id!r}: could not get it from {where}: {type(exc).__name__}: {exc}. "
        "Download it where the hub is reachable (into HF_HOME or download_dir), or set `model` to a local path."
    )


def _from_modelscope(model_id: str, revision: str | None, download_dir: str | None) -> Path:
    if importlib.util.find_spec("modelscope") is None:
        raise ModelLoadError(
            f"model 'modelscope:{model_id}' needs the modelscope package (pip install modelscope), "
            "or download it and set `model` to the local directory"
        )
    from modelscope import snapshot_download

    try:
        return Path(snapshot_download(model_id, revision=revision, cache_dir=download_dir))
    except Exception as exc:
        raise ModelLoadError(
            f"model 'modelscope:{model_id}': could not download it: {type(exc).__name__}: {exc}"
        ) from None
