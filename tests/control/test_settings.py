"""vdeploy/settings.py is the one declaration of every setting: the recipe model, EngineConfig, `vdeploy serve`'s
flags and the vLLM renderer must all agree with it, so a setting added in one place and forgotten in another fails
here."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
from pydantic import BaseModel

from vdeploy.backends import vllm
from vdeploy.cli import build_parser
from vdeploy.recipe import Recipe
from vdeploy.settings import BY_NAME, CONTROL_PLANE_ONLY, SETTINGS
from vdeploy_engine.config import EngineConfig

# EngineConfig fields that are not settings a user writes: the model (serve's positional MODEL, a recipe's `model`),
# what the compiler derives (the device from the profile) and what it records (its memory prediction).
ENGINE_DERIVED = {"model", "device", "predicted_memory"}


def recipe_leaves(model: type[BaseModel] = Recipe, prefix: str = "") -> set[str]:
    """Dotted paths of a recipe's settings: fields of the nested sections; `hardware` ({profile, count} or a name)
    and the control plane's own sections count as one setting each."""
    leaves = set()
    for name, field in model.model_fields.items():
        path = prefix + name
        section = field.annotation if isinstance(field.annotation, type) else None
        if section is not None and issubclass(section, BaseModel) and path not in CONTROL_PLANE_ONLY:
            leaves |= recipe_leaves(section, path + ".")
        else:
            leaves.add(path)
    return leaves


def serve_options() -> dict[str, argparse.Action]:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {action.dest: action for action in subparsers.choices["serve"]._actions if action.option_strings}


def test_every_recipe_field_is_a_setting_or_the_control_planes_own():
    declared = {s.path for s in SETTINGS if s.path} | set(CONTROL_PLANE_ONLY)
    assert recipe_leaves() == declared


def test_every_engine_config_field_is_a_setting_or_derived():
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    assert fields == {s.name for s in SETTINGS if s.engine} | ENGINE_DERIVED


def test_serve_takes_exactly_the_settings_with_flags():
    options = serve_options()
    own = {"help", "api_key", "config", "task"} | {o for o in options if o.startswith("vllm_flag:")}
    assert set(options) - own == {s.name for s in SETTINGS if s.flag}
    for setting in SETTINGS:
        if setting.flag:
            assert setting.flag in options[setting.name].option_strings
            assert setting.short is None or setting.short in options[setting.name].option_strings


def test_settings_without_a_flag_say_why():
    for setting in SETTINGS:
        if setting.flag is None or not setting.vllm:
            assert setting.why, f"{setting.name}: no serve flag or no vLLM flag, and no reason given"


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.vllm and s.engine], ids=lambda s: s.name)
def test_the_vllm_renderer_passes_every_setting_vllm_takes(setting):
    """A value other than vLLM's default reaches `vllm serve` under the setting's flag."""
    value = {"int": 3, "float": 0.5, "str": "x", "bool": True, "switch": False}[setting.kind]
    if setting.choices:
        value = setting.choices[-1]
    argv = vllm.argv({"model": "m", setting.name: value})
    if setting.kind == "switch":
        assert f"--no-{setting.flag[2:]}" in argv
    elif setting.kind == "bool":
        assert setting.flag in argv
    else:
        assert argv[argv.index(setting.flag) + 1] == str(value)


def test_serve_flags_become_the_plans_settings(smollm2_gguf_path):
    """What `vdeploy serve` parses reaches the EngineConfig the server starts from."""
    from vdeploy.commands.serve import engine_arguments
    from vdeploy.compiler import plan_from_args

    args = build_parser().parse_args(["serve", str(smollm2_gguf_path), "--hardware", "cpu", "--max-model-len", "512",
                                      "--no-enable-prefix-caching", "--seed", "7", "-tp", "1", "--port", "9001"])
    engine = plan_from_args(args.model, **engine_arguments(args)).engine
    assert (engine.max_model_len, engine.enable_prefix_caching, engine.seed, engine.port) == (512, False, 7, 9001)
    assert BY_NAME["enable_prefix_caching"].kind == "switch"
