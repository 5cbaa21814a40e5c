"""Hardware profiles (`profiles/*.yaml`) and detection of the local GPU for `hardware: auto`.

Profiles are data: what a GPU supports (dtypes, quantizations, CUDA graphs), how much memory it has, which toolchain
environment it needs and its known quirks. `VDEPLOY_PROFILE_PATH` (os.pathsep-separated folders) adds or overrides
profiles; the built-in ones come last: the repository's `profiles/` folder, which a wheel carries as
`vdeploy/data/profiles/`.
"""

from __future__ import annotations

import difflib
import functools
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

_PACKAGE = Path(__file__).resolve().parent
# Installed from a wheel, the profiles lie inside the package; in a source checkout (an editable install), beside it.
BUILTIN_PROFILES = next(
    (path for path in (_PACKAGE / "data" / "profiles", _PACKAGE.parent / "profiles") if path.is_dir()),
    _PACKAGE.parent / "profiles",
)
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class Quirk(BaseModel):
    issue: str
    fix: str


class HardwareProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str
    vendor: Literal["nvidia", "cpu"]
    compute_capability: float | None = None  # 7.5 for a T4; None for the CPU
    memory_gib: float = Field(gt=0, description="usable memory per GPU as the CUDA runtime reports it (GiB)")
    gpu_count: int = Field(1, ge=0, description="GPUs on the host when a recipe does not say")
    bf16: bool
    fp8: bool
    int8: bool
    cuda_graphs: bool  # whether capturing CUDA graphs is safe; False makes the compiler choose eager mode
    attention_backend: str
    interconnect: str
    max_num_seqs: int = Field(ge=1, description="default when a recipe leaves it auto")
    max_num_batched_tokens: int = Field(ge=1, description="default when a recipe leaves it auto")
    env: dict[str, str] = Field(default_factory=dict)  # toolchain environment every replica gets
    cache_dirs: list[str] = Field(default_factory=list)  # toolchain caches to clear when the compiler changes
    quirks: list[Quirk] = Field(default_factory=list)

    @property
    def device(self) -> Literal["cuda", "cpu"]:
        return "cpu" if self.vendor == "cpu" else "cuda"

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * (1 << 30))


class ProfileError(ValueError):
    """A profile name that matches no file, or a profile file that is invalid."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def _search_path() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("VDEPLOY_PROFILE_PATH", "").split(os.pathsep) if p]
    return [*extra, BUILTIN_PROFILES]


@functools.cache
def _read(path: Path) -> HardwareProfile:
    try:
        return HardwareProfile.model_validate(yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader))
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ProfileError(f"invalid hardware profile {path}: {exc}") from None


def profile_names() -> list[str]:
    names = {p.stem for folder in _search_path() if folder.is_dir() for p in folder.glob("*.yaml")}
    return sorted(names)


def load_profile(name: str) -> HardwareProfile:
    for folder in _search_path():
        path = folder / f"{name}.yaml"
        if path.is_file():
            return _read(path)
    names = profile_names()
    # "h100" means h100-80gb more likely than v100: a name the input begins beats a merely similar one.
    close = [n for n in names if n.startswith(name.lower())] or difflib.get_close_matches(name.lower(), names, n=1,
                                                                                           cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else f"known profiles: {', '.join(names)}"
    raise ProfileError(f"unknown hardware profile '{name}'", hint)


def list_profiles() -> list[HardwareProfile]:
    return [load_profile(name) for name in profile_names()]


# ----------------------------------------------------------------------------------------------------- detection


@dataclass
class Detection:
    profile: str
    count: int
    method: str  # nvidia-smi | nvml | torch | none
    gpu_name: str = ""
    memory_gib: float = 0.0
    compute_capability: float | None = None


# GPU product names as the driver reports them -> profile; A100s split by memory.
_NAME_TO_PROFILE = [("H200", "h200"), ("H100", "h100-80gb"), ("L4", "l4"), ("A10G", "a10g"), ("T4", "t4"),
                    ("V100", "v100")]


def profile_for_gpu(gpu_name: str, memory_gib: float) -> str | None:
    upper = gpu_name.upper()
    if "A100" in upper:
        return "a100-40gb" if memory_gib < 60 else "a100-80gb"
    words = upper.replace("-", " ").split()
    return next((profile for marker, profile in _NAME_TO_PROFILE if marker in words), None)


def _query_nvidia_smi() -> list[tuple[str, float, float | None]]:
    fields = "name,memory.total,compute_cap"
    out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    gpus = []
    for line in out.strip().splitlines():
        name, mib, cap = (part.strip() for part in line.split(","))
        gpus.append((name, float(mib) / 1024, float(cap) if cap.replace(".", "").isdigit() else None))
    return gpus


def _query_nvml() -> list[tuple[str, float, float | None]]:
    import pynvml  # optional: nvidia-ml-py

    pynvml.nvmlInit()
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            gpus.append((name.decode() if isinstance(name, bytes) else name, total / (1 << 30), major + minor / 10))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def _query_torch() -> list[tuple[str, float, float | None]]:
    import torch  # only reached when neither nvidia-smi nor NVML is present

    if not torch.cuda.is_available():
        return []
    props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    return [(p.name, p.total_memory / (1 << 30), p.major + p.minor / 10) for p in props]


def detect() -> Detection:
    """The local GPUs, asked of nvidia-smi, then NVML, then torch, whichever is present; `cpu` when there is none."""
    probes = []
    if shutil.which("nvidia-smi"):
        probes.append(("nvidia-smi", _query_nvidia_smi))
    probes += [("nvml", _query_nvml), ("torch", _query_torch)]
    for method, probe in probes:
        try:
            gpus = probe()
        except Exception:  # a missing library or a broken driver: try the next probe
            continue
        if gpus:
            name, memory_gib, capability = gpus[0]
            profile = profile_for_gpu(name, memory_gib) or "generic"
            return Detection(profile, len(gpus), method, name, memory_gib, capability)
    return Detection("cpu", 0, "none", memory_gib=_machine_memory_gib())


def _machine_memory_gib() -> float:
    import psutil

    return psutil.virtual_memory().total / (1 << 30)


def detected_profile(detection: Detection) -> HardwareProfile:
    """The profile for a detection; a GPU without a profile gets one built from what the driver reported."""
    if detection.profile == "cpu" and detection.memory_gib:
        # This machine's RAM is the budget (gpu_memory_utilization applies to it, as vLLM's CPU KV-cache space does);
        # `hardware: cpu` keeps the fixed profile for plans made on another machine.
        return load_profile("cpu").model_copy(update={
            "memory_gib": round(detection.memory_gib, 2),
            "description": f"this machine's CPU with {detection.memory_gib:.1f} GiB of RAM (detected)"})
    if detection.profile != "generic":
        return load_profile(detection.profile)
    capability = detection.compute_capability or 7.0
    return HardwareProfile(
        name="generic", description=f"{detection.gpu_name} (no profile; detected)", vendor="nvidia",
        compute_capability=capability, memory_gib=round(detection.memory_gib, 2), gpu_count=detection.count,
        bf16=capability >= 8.0, fp8=capability >= 8.9, int8=True, cuda_graphs=True, attention_backend="flash-attn"
        if capability >= 8.0 else "xformers", interconnect="unknown", max_num_seqs=256, max_num_batched_tokens=2048,
    )
