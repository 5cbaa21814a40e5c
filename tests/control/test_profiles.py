"""Hardware profiles: the required set, their facts, detection's GPU-name mapping, and the `profiles` command."""

from __future__ import annotations

import pytest

from vdeploy.profiles import ProfileError, list_profiles, load_profile, profile_for_gpu

REQUIRED = {"cpu", "t4", "v100", "a10g", "l4", "a100-40gb", "a100-80gb", "h100-80gb", "h200"}


def test_required_profiles_exist():
    assert REQUIRED <= {p.name for p in list_profiles()}


@pytest.mark.parametrize("name", sorted(REQUIRED - {"cpu"}))
def test_dtype_support_follows_compute_capability(name):
    p = load_profile(name)
    assert p.device == "cuda" and p.memory_gib > 10
    assert p.bf16 == (p.compute_capability >= 8.0)  # bfloat16 needs SM80+
    assert p.fp8 == (p.compute_capability >= 8.9)  # fp8 needs SM89+


def test_t4_profile():
    t4 = load_profile("t4")
    assert (t4.compute_capability, t4.cuda_graphs, t4.bf16) == (7.5, False, False)
    assert t4.env == {"CC": "/usr/bin/gcc-12", "CXX": "/usr/bin/g++-12"}
    assert "~/.cache/flashinfer" in t4.cache_dirs and t4.quirks


def test_unknown_profile_suggests_one():
    with pytest.raises(ProfileError) as caught:
        load_profile("h100")
    assert caught.value.hint == "did you mean 'h100-80gb'?"


def test_user_profiles_override(tmp_path, monkeypatch):
    (tmp_path / "t4.yaml").write_text(load_profile("t4").model_copy(update={"memory_gib": 15.0}).model_dump_json())
    monkeypatch.setenv("VDEPLOY_PROFILE_PATH", str(tmp_path))
    assert load_profile("t4").memory_gib == 15.0


@pytest.mark.parametrize(("gpu", "memory", "profile"), [
    ("Tesla T4", 15.0, "t4"), ("NVIDIA A100-SXM4-40GB", 39.4, "a100-40gb"), ("NVIDIA A100 80GB PCIe", 79.2, "a100-80gb"),
    ("NVIDIA H100 80GB HBM3", 79.1, "h100-80gb"), ("NVIDIA H200", 139.8, "h200"), ("NVIDIA L4", 22.0, "l4"),
    ("NVIDIA A10G", 22.2, "a10g"), ("Tesla V100-SXM2-16GB", 15.8, "v100"), ("NVIDIA L40S", 44.5, None),
])
def test_gpu_names_map_to_profiles(gpu, memory, profile):
    assert profile_for_gpu(gpu, memory) == profile


def test_profiles_commands(cli):
    listing = cli("profiles", "list")
    assert listing.code == 0 and all(name in listing.out for name in REQUIRED)
    show = cli("profiles", "show", "t4")
    assert show.code == 0 and "CC: /usr/bin/gcc-12" in show.out and "compute_capability: 7.5" in show.out
    missing = cli("profiles", "show", "t5")
    assert missing.code == 1 and "did you mean 't4'" in missing.err
    detected = cli("profiles", "detect")
    assert detected.code == 0 and "profile " in detected.out
