"""`vdeploy plan --sweep`: what fits as one setting varies (golden text, JSON shape), and the budget's stacked bar."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ConfigDict, TypeAdapter
from typing_extensions import TypedDict

from tests.control.conftest import RECIPES
from tests.fixtures.golden import assert_golden
from vdeploy.commands.plan import budget_bar
from vdeploy.plan import MemoryBudget
from vdeploy.sweep import SweepError, setting_path, sweep_values

QUICKSTART = RECIPES / "quickstart-smollm2-cpu.yaml"
SEED_T4 = RECIPES / "deepseek-qwen-7b-2xt4.yaml"


class ErrorJson(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    code: str
    message: str
    hint: str | None
    field: str | None


class RowJson(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    value: int | float | str | bool
    fits: bool
    max_model_len: int | None
    max_num_seqs: int | None
    tensor_parallel_size: int | None
    kv_tokens: int | None
    kv_cache_bytes: int | None
    max_concurrency: float | None
    error: ErrorJson | None


class SweepJson(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    name: str
    setting: str
    rows: list[RowJson]


def test_max_model_len_sweep_of_the_quickstart(cli):
    result = cli("plan", QUICKSTART, "--sweep", "memory.max_model_len=2048..32768")
    assert result.code == 0, result.err
    assert_golden("plan-sweep-quickstart-max_model_len.txt", result.out)
    # The model knows 8192 positions: 16384 is the first that fails, and it says so.
    assert "first that does not fit: memory.max_model_len=16384: VD207" in result.out


def test_utilization_sweep_of_the_seed_t4_deployment(cli):
    result = cli("plan", SEED_T4, "--sweep", "gpu_memory_utilization=0.5..0.95")
    assert result.code == 0, result.err
    assert_golden("plan-sweep-seed-t4-gpu_memory_utilization.txt", result.out)


def test_hardware_sweep_keeps_the_gpu_count_and_names_each_reason(cli):
    out = cli("plan", SEED_T4, "--sweep", "hardware=t4,cpu,h100-80gb").out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:5]}
    assert rows["t4"][1] == "yes" and rows["h100-80gb"][1] == "yes" and rows["cpu"][1] == "no"
    assert "hardware=cpu: VD301 the model does not fit" in out


def test_sweep_json_and_yaml_have_one_shape(cli):
    result = cli("plan", SEED_T4, "--sweep", "tensor_parallel_size=1,2,4", "-o", "json")
    data = TypeAdapter(SweepJson).validate_python(result.json(), strict=True)
    assert [(r["value"], r["fits"], r["error"] and r["error"]["code"]) for r in data["rows"]] == [
        (1, False, "VD301"), (2, True, None), (4, False, "VD102")]
    as_yaml = yaml.safe_load(cli("plan", SEED_T4, "--sweep", "tensor_parallel_size=1,2,4", "-o", "yaml").out)
    assert as_yaml == result.json()


@pytest.mark.parametrize("argument, message", [
    ("memory.max_modle_len=1..4", "no recipe setting named 'memory.max_modle_len' (did you mean memory.max_model_len?)"),
    ("max_model_len", "give KEY=VALUES"),
    ("max_model_len=big..bigger", "is not a range of numbers"),
    ("max_model_len=4096..2048", "needs 0 < A <= B"),
])
def test_bad_sweep_arguments_are_clear_errors(cli, argument, message):
    result = cli("plan", QUICKSTART, "--sweep", argument)
    assert result.code == 1 and message in result.err and "Traceback" not in result.err


def test_sweep_values():
    key = setting_path("max_model_len")
    assert key == ("memory", "max_model_len")
    assert sweep_values("2048..32768", key) == [2048, 4096, 8192, 16384, 32768]
    assert sweep_values("3..10", key) == [3, 6, 10]  # the upper bound is always tried
    assert sweep_values("1..10:3", key) == [1, 4, 7, 10]
    assert sweep_values("0.8..0.95", ("memory", "gpu_memory_utilization")) == [0.8, 0.85, 0.9, 0.95]
    assert sweep_values("t4, l4", ("hardware",)) == ["t4", "l4"]
    assert "h100-80gb" in sweep_values("all", ("hardware",))
    with pytest.raises(SweepError):
        setting_path("nope")


def _budget(**bytes_: int) -> MemoryBudget:
    terms = {"weights_bytes": 0, "activation_bytes": 0, "cuda_graph_bytes": 0, "overhead_bytes": 0,
             "kv_cache_bytes": 0}
    return MemoryBudget(budget_bytes=100, kv_bytes_per_token=1, kv_tokens=0, max_model_len=1,
                        **{**terms, **bytes_})


def test_budget_bar_is_proportional_and_marks_unused_and_overflow():
    bar = budget_bar(_budget(weights_bytes=50, overhead_bytes=1, kv_cache_bytes=29), width=20)
    assert bar == "  [WWWWWWWWWWOKKKKK....]  W weights  O overhead  K kv cache  . unused"
    over = budget_bar(_budget(weights_bytes=150, kv_cache_bytes=-50), width=10)
    assert over == "  [WWWWWWWWWW]  W weights  over budget by 0.00 GiB"


def test_plan_text_shows_the_budget_as_a_stacked_bar(cli):
    result = cli("plan", SEED_T4)
    assert result.code == 0
    assert_golden("plan-seed-t4.txt", result.out)
