"""The compiler: every seed recipe against its profile (resolved values written out), the memory model against hand
calculations for two models (worked from each model's own config in the test: the file's GGUF metadata, the published
config.json), auto resolution, and plan_from_args (the path `vdeploy serve` and `LLM(...)` take). Whether the formulas
match what the engine really holds is measured in tests/engine/test_memory_truth.py."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tests.control.conftest import RECIPES
from vdeploy.compiler import PlanError, compile, plan_from_args, plan_recipe
from vdeploy.modelinfo import resolve_model
from vdeploy.profiles import load_profile
from vdeploy.recipe import Recipe, load_recipes
from vdeploy_engine.config import EngineConfig

GiB = 1 << 30
MiB = 1 << 20


def plan_of(file: str, index: int = 0):
    document = load_recipes(RECIPES / file)[index]
    plan, diagnostics = plan_recipe(document.recipe, document.source)
    assert not diagnostics, diagnostics
    return plan


def plan_for(**recipe):
    """Plan a recipe given as keyword data (sections as dicts)."""
    plan, diagnostics = plan_recipe(Recipe.model_validate(recipe))
    return plan, diagnostics


# file, document index -> engine settings the compiler must resolve (the recipe's own and the ones it decides)
SEED_EXPECTATIONS = {
    ("quickstart-smollm2-cpu.yaml", 0): dict(
        device="cpu", dtype="float32", quantization="gguf", runner="generate", enforce_eager=True,
        max_model_len=4096, max_num_seqs=16, max_num_batched_tokens=2048, tensor_parallel_size=1, port=8000,
        served_model_name="smollm2-135m-instruct", kv_cache_memory_bytes=767 * 16 * 46_080),  # whole blocks
    ("opt-125m-offline.yaml", 0): dict(
        device="cuda", dtype="float16", quantization=None, enforce_eager=True, max_model_len=2048, max_num_seqs=256,
        max_num_batched_tokens=2048, model="facebook/opt-125m", kv_cache_memory_bytes=None),
    ("qwen2.5-7b-instruct-tp2.yaml", 0): dict(
        device="cuda", dtype="float16", enforce_eager=True, tensor_parallel_size=2, max_model_len=32768,
        max_num_seqs=256, max_num_batched_tokens=2048),
    ("deepseek-qwen-7b-2xt4.yaml", 0): dict(
        dtype="float16", enforce_eager=True, tensor_parallel_size=2, max_model_len=16384, max_num_seqs=2,
        gpu_memory_utilization=0.8, swap_space=1, served_model_name="Qwen2.5:0.5B"),
    ("qwq-32b-awq.yaml", 0): dict(
        dtype="float16", quantization="awq", tensor_parallel_size=2, max_model_len=4096, enforce_eager=True),
    ("qwq-32b-gguf.yaml", 0): dict(
        dtype="float16", quantization="gguf", tensor_parallel_size=2, max_model_len=4096, max_num_seqs=16, port=8002),
    ("jina-embeddings-v4-t4.yaml", 0): dict(
        runner="pooling", convert="embed", dtype="float16", enforce_eager=True, trust_remote_code=True,
        max_model_len=128000, port=8010, model="jinaai/jina-embeddings-v4-vllm-retrieval"),
    ("jina-embeddings-v4-t4.yaml", 1): dict(
        runner="pooling", convert="embed", dtype="float16", enforce_eager=True, trust_remote_code=True,
        port=8011, model="jinaai/jina-embeddings-v4-vllm-text-matching"),
    ("qwen2.5-72b-instruct-tp2.yaml", 0): dict(
        device="cuda", dtype="bfloat16", enforce_eager=False, tensor_parallel_size=2, max_model_len=16384,
        gpu_memory_utilization=0.95, max_num_seqs=32, max_num_batched_tokens=8192),
}


@pytest.mark.parametrize(("file", "index"), list(SEED_EXPECTATIONS), ids=[f"{f}#{i}" for f, i in SEED_EXPECTATIONS])
def test_seed_recipe_resolves(file, index):
    plan = plan_of(file, index)
    engine = plan.engine.to_dict()
    assert {k: engine[k] for k in SEED_EXPECTATIONS[(file, index)]} == SEED_EXPECTATIONS[(file, index)]
    assert plan.memory is not None and plan.memory.kv_tokens >= plan.engine.max_model_len


def test_every_recipe_has_expectations():
    documents = {(path.name, i) for path in RECIPES.glob("*.yaml") for i, _ in enumerate(load_recipes(path))}
    assert documents == set(SEED_EXPECTATIONS)


def test_t4_plans_carry_the_toolchain_env():
    plan = plan_of("deepseek-qwen-7b-2xt4.yaml")
    assert plan.env == {"CC": "/usr/bin/gcc-12", "CXX": "/usr/bin/g++-12"}
    assert (plan.profile, plan.gpu_count, plan.replicas) == ("t4", 2, 1)


def test_recipe_env_overrides_profile_env():
    plan, _ = plan_for(model="facebook/opt-125m", hardware="t4", env={"CC": "/opt/gcc", "HF_HUB_OFFLINE": "1"})
    assert plan.env == {"CC": "/opt/gcc", "CXX": "/usr/bin/g++-12", "HF_HUB_OFFLINE": "1"}


def test_memory_hand_calculation_smollm2_on_cpu(smollm2_gguf_path):
    """SmolLM2-135M (GGUF) on the cpu profile, worked by hand from the GGUF file's own metadata."""
    from vdeploy_engine.gguf_header import read_gguf_header

    header = read_gguf_header(smollm2_gguf_path)
    meta = {k.removeprefix("llama."): v for k, v in header.metadata.items()}
    layers, hidden, intermediate = meta["block_count"], meta["embedding_length"], meta["feed_forward_length"]
    heads, kv_heads, vocab = meta["attention.head_count"], meta["attention.head_count_kv"], meta["tokenizer.ggml.tokens"]
    assert (layers, hidden, intermediate, heads, kv_heads, vocab) == (30, 576, 1536, 9, 3, 49152)
    params = sum(t.n_elements for t in header.tensors)
    assert "output.weight" not in {t.name for t in header.tensors}  # the LM head is tied to the embedding
    head_dim, fp32 = hidden // heads, 4
    tokens, seqs = 2048, 16  # the cpu profile's max_num_batched_tokens and max_num_seqs

    m = plan_of("quickstart-smollm2-cpu.yaml").memory
    budget = int(int(2.0 * GiB) * 0.9)  # cpu profile: 2 GiB of RAM, default utilisation 0.9
    assert m.budget_bytes == budget
    # Every GGUF block expanded to float32 at load; the tied head once more, packed for oneDNN.
    assert m.weights_bytes == params * fp32 + vocab * hidden * fp32 == 651_306_240
    # The largest step: at the MLP the residual stream and the normed input (2 x hidden), gate and up (2 x
    # intermediate) and their SiLU product (intermediate), and the norm's float32 copy of the hidden state...
    forward = tokens * ((2 * hidden + 3 * intermediate) * fp32 + hidden * 4)
    logits = seqs * vocab * fp32  # ... then one row of logits per sequence ...
    # ... and the sampler's top-k/top-p buffers per logit: float32 copy, scaled, sorted values and their int64 order,
    # masked copy, probabilities, cumulative sum, mass before (7 x 4 + 8 bytes) and a boolean mask, rounded up to 40.
    sampler = seqs * vocab * 40
    assert m.activation_bytes == forward + logits + sampler
    process = 600 * MiB  # the CPU replica's interpreter, torch, tokenizer and server, as measured at start-up
    assert (m.cuda_graph_bytes, m.overhead_bytes) == (0, process)
    kv_per_token = 2 * layers * kv_heads * head_dim * fp32  # K and V, every layer, every KV head, float32
    assert m.kv_bytes_per_token == kv_per_token == 46_080
    left = budget - m.weights_bytes - m.activation_bytes - process
    assert m.kv_tokens == left // (kv_per_token * 16) * 16  # what is left, in whole 16-token blocks
    assert m.kv_cache_bytes == m.kv_tokens * kv_per_token  # the bytes the engine allocates
    assert m.max_concurrency == round(m.kv_tokens / 4096, 2)


def test_memory_hand_calculation_qwen_7b_tp2_on_t4():
    """Qwen2.5-7B-Instruct, TP 2 over two T4s, float16, eager, worked by hand (per GPU) from its config.json."""
    hidden, intermediate, layers, heads, kv_heads, vocab = 3584, 18944, 28, 28, 4, 152064  # config.json
    head_dim, kv_width, fp16, tp = hidden // heads, kv_heads * (hidden // heads), 2, 2
    per_layer = (
        hidden * hidden + hidden  # q_proj with its bias
        + 2 * (hidden * kv_width + kv_width)  # k_proj, v_proj with biases
        + hidden * hidden  # o_proj
        + 3 * hidden * intermediate  # gate, up, down
        + 2 * hidden  # two RMSNorms
    )
    params = layers * per_layer + 2 * vocab * hidden + hidden  # untied embedding and LM head, the final norm
    assert params == 7_615_616_512

    m = plan_of("qwen2.5-7b-instruct-tp2.yaml").memory
    budget = int(int(14.74 * GiB) * 0.9)
    weights = params * fp16 // tp
    tokens, seqs = 2048, 256  # the t4 profile's defaults
    forward = tokens * ((2 * hidden + 3 * intermediate // tp) * fp16 + hidden * 4)  # the MLP's share is split by TP
    logits = seqs * vocab * fp16
    sampler = seqs * vocab * 40
    overhead = 512 * MiB + 320 * MiB  # CUDA context + NCCL buffers (TP > 1)
    assert (m.budget_bytes, m.weights_bytes) == (budget, weights)
    assert m.activation_bytes == forward + logits + sampler == 1_810_104_320
    assert (m.cuda_graph_bytes, m.overhead_bytes) == (0, overhead)
    assert m.kv_cache_bytes == budget - weights - m.activation_bytes - overhead
    assert m.kv_bytes_per_token == 2 * layers * (kv_heads // tp) * head_dim * fp16 == 28_672
    assert m.kv_tokens == m.kv_cache_bytes // (28_672 * 16) * 16


def test_cuda_graphs_counted_when_not_eager():
    m = plan_of("qwen2.5-72b-instruct-tp2.yaml").memory
    assert m.cuda_graph_bytes > 0
    total = m.weights_bytes + m.activation_bytes + m.cuda_graph_bytes + m.overhead_bytes + m.kv_cache_bytes
    assert total == m.budget_bytes


@pytest.mark.parametrize(("profile", "dtype", "eager"), [("t4", "float16", True), ("v100", "float16", False),
                                                         ("a100-80gb", "bfloat16", False), ("cpu", "float32", True)])
def test_dtype_and_eager_follow_the_profile(profile, dtype, eager):
    plan, _ = plan_for(model="facebook/opt-125m", hardware=profile)
    assert (plan.engine.dtype, plan.engine.enforce_eager) == (dtype, eager)
    assert plan.engine.device == ("cpu" if profile == "cpu" else "cuda")


def test_auto_max_model_len_is_the_largest_that_fits():
    plan, diagnostics = plan_for(model="Qwen/Qwen2.5-72B-Instruct", hardware={"profile": "h100-80gb", "count": 2},
                                 parallelism={"tensor_parallel_size": 2}, memory={"max_num_seqs": 32})
    assert not diagnostics
    assert plan.engine.max_model_len == 8848 == plan.memory.kv_tokens
    [decision] = [d for d in plan.decisions if d.field == "memory.max_model_len"]
    assert "largest that fits" in decision.reason


def test_chunked_prefill_off_batches_a_whole_prompt():
    plan, _ = plan_for(model="facebook/opt-125m", hardware="t4", runtime={"enable_chunked_prefill": False})
    assert plan.engine.max_num_batched_tokens == plan.engine.max_model_len == 2048


def test_tp_may_exceed_kv_heads_when_it_replicates_them_evenly():
    plan, diagnostics = plan_for(model="Qwen/Qwen2.5-0.5B-Instruct", hardware={"profile": "a10g", "count": 2},
                                 parallelism={"tensor_parallel_size": 2})
    assert not diagnostics
    _, bad = plan_for(model="Qwen/Qwen2.5-0.5B-Instruct", hardware={"profile": "a10g", "count": 8},
                      parallelism={"tensor_parallel_size": 7})
    assert [d.code for d in bad] == ["VD206"]
    assert bad[0].hint == "use one of 1, 2"


def test_pooling_runner_on_a_causal_lm_needs_a_conversion():
    plan, diagnostics = plan_for(model="facebook/opt-125m", hardware="t4", runner="pooling")
    assert not diagnostics and plan.engine.convert == "embed"
    _, diagnostics = plan_for(model="facebook/opt-125m", hardware="t4", runner="pooling", convert="none")
    assert [d.code for d in diagnostics] == ["VD205"]


def test_embedding_model_chooses_pooling(minilm_dir):
    plan, diagnostics = plan_for(model=str(minilm_dir), hardware="cpu")
    assert not diagnostics
    assert (plan.engine.runner, plan.engine.convert, plan.engine.model) == ("pooling", "embed", str(minilm_dir))
    assert plan.memory.activation_bytes == 2048 * ((2 * 384 + 3 * 1536) * 4 + 384 * 4)  # no logits: an encoder


def test_awq_checkpoint_on_v100_is_refused():
    _, diagnostics = plan_for(model="Qwen/QwQ-32B-AWQ", hardware={"profile": "v100", "count": 4},
                              parallelism={"tensor_parallel_size": 4})
    [d] = diagnostics
    assert d.code == "VD104" and "7.5" in d.message and d.field == "model"


def test_compile_is_pure_and_deterministic():
    recipe = load_recipes(RECIPES / "qwq-32b-awq.yaml")[0].recipe
    facts, _ = resolve_model(recipe.model)
    profile = load_profile("t4").model_copy(update={"gpu_count": 2})
    first = compile(recipe, profile, facts)
    second = compile(recipe, profile, facts)
    assert first.model_dump_json() == second.model_dump_json()


def test_plan_json_round_trips_through_engine_config(cli):
    result = cli("plan", RECIPES / "quickstart-smollm2-cpu.yaml", "--format", "json")
    assert result.code == 0
    data = result.json()
    assert set(data["memory"]) == {"budget_bytes", "weights_bytes", "activation_bytes", "cuda_graph_bytes",
                                   "overhead_bytes", "kv_cache_bytes", "kv_bytes_per_token", "kv_tokens",
                                   "max_model_len", "max_concurrency"}
    config = EngineConfig.from_json(result.out)  # the engine reads a whole plan
    assert config.max_model_len == 4096 and config.device == "cpu"
    assert dataclasses.asdict(config.predicted_memory) == data["memory"]
    assert all(set(d) == {"field", "value", "reason"} for d in data["decisions"])
    assert data["diagnostics"] == []


# ------------------------------------------------------------------------------------------------ plan_from_args


def test_plan_from_args_takes_vllm_keywords(smollm2_gguf_path):
    plan = plan_from_args(str(smollm2_gguf_path), device="cpu", max_model_len=1024, max_num_seqs=4, seed=7,
                          enable_prefix_caching=False, download_dir="/tmp/models", gpu_memory_utilization=None)
    e = plan.engine
    assert (e.device, e.max_model_len, e.max_num_seqs, e.seed, e.enable_prefix_caching) == ("cpu", 1024, 4, 7, False)
    assert e.download_dir == "/tmp/models" and e.kv_cache_memory_bytes > 0
    assert e.gpu_memory_utilization == 0.9  # None means "not given"


def test_plan_from_args_errors_name_the_argument():
    with pytest.raises(PlanError) as caught:
        plan_from_args("facebook/opt-125m", hardware="t4", dtype="bfloat16")
    assert "VD103" in str(caught.value) and "dtype: half" in str(caught.value)
    with pytest.raises(PlanError) as caught:
        plan_from_args("facebook/opt-125m", hardware="t4", max_num_seq=4)
    assert caught.value.diagnostics[0].hint == "did you mean 'max_num_seqs'?"
    with pytest.raises(PlanError) as caught:
        plan_from_args("facebook/opt-125m", hardware="cpu", task="embed")
    assert caught.value.diagnostics[0].code == "VD006"


def test_plan_from_args_keeps_warnings():
    plan = plan_from_args("nobody/unknown-model", hardware="cpu")
    assert [d.code for d in plan.diagnostics] == ["VD202"]
    assert plan.memory is None and plan.engine.max_model_len == 2048
    assert plan.engine.kv_cache_memory_bytes > 0  # the CPU engine always gets a size
    assert json.loads(plan.engine.to_json())["model"] == "nobody/unknown-model"


def test_fixed_kv_cache_size_is_used_and_checked():
    plan, diagnostics = plan_for(model="facebook/opt-125m", hardware="t4", memory={"kv_cache_memory_bytes": 2 * GiB})
    assert not diagnostics
    assert plan.engine.kv_cache_memory_bytes == plan.memory.kv_cache_bytes == 2 * GiB
    assert plan.memory.kv_tokens == 2 * GiB // (36_864 * 16) * 16  # opt-125m: 2 x 12 layers x 768 x fp16
    _, [too_big] = plan_for(model="facebook/opt-125m", hardware="t4", memory={"kv_cache_memory_bytes": 20 * GiB})
    assert too_big.code == "VD301" and "the t4 has 14.74 GiB" in too_big.message


def test_auto_max_num_seqs_shrinks_until_something_fits():
    """72B on two H100s at the defaults: 256 sequences' sampler buffers leave no KV cache, so auto halves the batch."""
    plan, diagnostics = plan_for(model="Qwen/Qwen2.5-72B-Instruct", hardware={"profile": "h100-80gb", "count": 2},
                                 parallelism={"tensor_parallel_size": 2})
    assert not diagnostics
    assert (plan.engine.max_num_seqs, plan.engine.max_model_len) == (128, 4688)
    [decision] = [d for d in plan.decisions if d.field == "memory.max_num_seqs"]
    assert "halved" in decision.reason
    _, [fixed] = plan_for(model="Qwen/Qwen2.5-72B-Instruct", hardware={"profile": "h100-80gb", "count": 2},
                          parallelism={"tensor_parallel_size": 2}, memory={"max_num_seqs": 256, "max_model_len": 4096})
    assert fixed.code == "VD301" and "`max_num_seqs: 128`" in fixed.hint
