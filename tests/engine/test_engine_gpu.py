"""The whole engine on CUDA: decode through captured CUDA graphs gives the tokens eager execution and transformers give,
and start-up measures memory the way the plan predicts it."""

from __future__ import annotations

import gc

import pytest

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 17, 42, 99, 7], [3] * 40, list(range(10, 130))]


def _greedy(model_dir, prompts=PROMPTS, **kwargs) -> tuple[list[list[int]], dict]:
    """Greedy tokens for the prompts, and what start-up measured. The engine is freed before returning: a live one's KV
    cache would count as memory outside the next engine's reach."""
    import torch

    from vdeploy_engine import LLM, SamplingParams

    llm = LLM(str(model_dir), dtype="float32", gpu_memory_utilization=0.2, max_model_len=256, **kwargs)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    runner = llm.llm_engine.runner
    facts = dict(
        graphs=runner.graphs is not None and bool(runner.graphs.graphs),
        measured=dict(runner.measured),
        predicted=runner.config.predicted_memory,
        bytes_per_block=runner.bytes_per_block,
    )
    del llm, runner
    gc.collect()
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outputs], facts


def test_cuda_graph_decode_matches_eager_and_transformers(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    graphed, facts = _greedy(tiny_llama_dir)
    assert facts["graphs"], "decode steps should replay CUDA graphs"
    assert facts["measured"]["cuda_graph_bytes"] > 0
    eager, eager_facts = _greedy(tiny_llama_dir, enforce_eager=True)
    assert not eager_facts["graphs"]
    assert graphed == eager

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).cuda().eval()
    for prompt, tokens in zip(PROMPTS, graphed, strict=True):
        ids = torch.tensor([prompt], device="cuda")
        want = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=24,
            min_new_tokens=24,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        assert tokens == want


def test_programmatic_dependent_launch_changes_no_token(tiny_llama_dir, monkeypatch):
    """Batch-1 decode chains its fused kernels with programmatic dependent launch (Hopper): each kernel starts while
    the one before drains. A kernel that read or wrote before its wait would race; the tokens must equal a run
    without PDL, through CUDA graphs and eagerly."""
    import torch

    import vdeploy_kernels.launch

    if not vdeploy_kernels.launch.pdl(torch.empty(0, device="cuda")):
        pytest.skip("programmatic dependent launch needs Hopper or later")
    prompts = PROMPTS[2:]  # one sequence: every decode step takes the fused path
    with_pdl = [_greedy(tiny_llama_dir, prompts)[0], _greedy(tiny_llama_dir, prompts, enforce_eager=True)[0]]
    monkeypatch.setattr(vdeploy_kernels.launch, "ENABLED", False)
    assert with_pdl == [_greedy(tiny_llama_dir, prompts)[0], _greedy(tiny_llama_dir, prompts, enforce_eager=True)[0]]


@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
def test_startup_measures_memory_within_the_plan(tiny_llama_dir, eager):
    """Each component start-up measures (weights, the profiling step's peak, CUDA graphs, the CUDA context, the KV
    cache) sits within 5% of the plan's prediction and the total never above it; the KV cache got every byte the plan
    promised (had the other components been under-predicted, what was left would have been smaller)."""
    from vdeploy_engine.worker.memory_use import memory_problems

    _, facts = _greedy(tiny_llama_dir, enforce_eager=eager)
    measured, predicted = facts["measured"], facts["predicted"]
    assert set(measured) == {"weights_bytes", "activation_bytes", "cuda_graph_bytes", "overhead_bytes", "kv_cache_bytes"}
    assert measured["kv_cache_bytes"] > predicted.kv_cache_bytes - 2 * facts["bytes_per_block"]
    assert memory_problems("cuda", predicted, measured) == []


def test_run_ahead_decode_gives_eager_outputs(tiny_llama_dir):
    """Plain greedy decode runs one step ahead of the host (tokens land a step late). Requests that stop at different
    steps (length, a stop token, a stop string), one that may not stop yet (min_tokens, so its batch runs in lock
    step) and an abandoned stream give exactly what eager execution gives, and every KV block comes back."""
    import torch

    from vdeploy_engine import LLM, SamplingParams

    def run(**kwargs):
        llm = LLM(str(tiny_llama_dir), dtype="float32", gpu_memory_utilization=0.2, max_model_len=256, **kwargs)
        engine = llm.llm_engine
        launches = []
        if engine.runner.graphs is not None:
            launch = engine.runner.launch_decode
            engine.runner.launch_decode = lambda *a, **k: launches.append(1) or launch(*a, **k)
        base = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)
        ids, text = base[0].outputs[0].token_ids, base[1].outputs[0].text
        stop_token = next(t for i, t in enumerate(ids) if i >= 5 and t not in ids[:i])  # first seen mid-run
        stop_text = next(text[i : i + 3] for i in range(8, len(text)) if text.find(text[i : i + 3]) == i)
        params = [
            SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_token], ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=30, stop=[stop_text], ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=17, min_tokens=12),
        ]
        outputs = llm.generate([PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[2]], params, use_tqdm=False)
        stream = llm.stream(PROMPTS, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        for _ in range(10):
            next(stream)
        stream.close()  # aborts the rest mid-flight
        again = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
        free = engine.kv.num_free_blocks == engine.runner.num_blocks
        result = [
            [(c.token_ids, c.text, c.finish_reason) for o in batch for c in o.outputs]
            for batch in (base, outputs, again)
        ]
        del llm, engine
        gc.collect()
        torch.cuda.empty_cache()
        return result, len(launches), free

    graphed, launches, graphed_free = run()
    eager, _, eager_free = run(enforce_eager=True)
    assert launches > 30, "plain greedy decode steps should run ahead"
    assert graphed == eager
    assert [finish for *_, finish in graphed[1]] == ["length", "stop", "stop", "length"]
    assert graphed_free and eager_free
