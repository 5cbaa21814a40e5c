"""The engine end to end on the tiny random Llama: batching, caching, chunking and preemption never change tokens;
SamplingParams behave as in vLLM; KV blocks are accounted for."""

from __future__ import annotations

import pytest
import torch
from engine_test_utils import random_prompts

from vdeploy_engine import SamplingParams
from vdeploy_engine.core.engine import InvalidPromptError
from vdeploy_engine.sampling_params import SamplingParamsError

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def seeded(i: int) -> SamplingParams:
    return SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i, max_tokens=8, ignore_eos=True)


PROMPTS = random_prompts(32, 3, 60)
SHARED = [[7] * 23 + p for p in PROMPTS[:8]]  # a common 23-token prefix: five full blocks of 4 to reuse
PARAMS = [GREEDY if i % 2 else seeded(i) for i in range(32)]


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def alone(make_llm) -> list[list[int]]:
    """Each request on its own, in an engine with no prefix cache."""
    llm = make_llm(enable_prefix_caching=False)
    return [
        llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids
        for p, params in zip(PROMPTS, PARAMS, strict=True)
    ]


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_mistral_dir", "tiny_opt_dir"])
def test_greedy_tokens_match_transformers(request, fixture):
    from transformers import AutoModelForCausalLM

    from vdeploy_engine import LLM

    model_dir = request.getfixturevalue(fixture)
    llm = LLM(str(model_dir), dtype="float32", max_model_len=128, block_size=4, kv_cache_memory_bytes=1 << 20)
    prompts = PROMPTS[:4]
    ours = token_ids(llm.generate(prompts, GREEDY, use_tqdm=False))
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for prompt, tokens in zip(prompts, ours, strict=True):
        ids = torch.tensor([prompt])
        expected = hf.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, len(prompt) :]
        assert tokens == expected.tolist()


@pytest.mark.parametrize(
    "engine_args",
    [
        pytest.param({}, id="batch-of-32"),
        pytest.param(dict(max_num_batched_tokens=8, max_num_seqs=8), id="chunked-prefill-8"),
        pytest.param(dict(max_num_seqs=3), id="max-num-seqs-3"),
        # 40 blocks of 4 tokens (2 KiB each): one max_model_len sequence fits, 32 at once do not.
        pytest.param(dict(kv_cache_memory_bytes=80 * 1024), id="preempt-recompute"),
        pytest.param(dict(kv_cache_memory_bytes=80 * 1024, swap_space=64 * 1024 / (1 << 30)), id="preempt-swap"),
    ],
)
def test_same_tokens_whatever_the_batch(make_llm, alone, engine_args):
    llm = make_llm(**engine_args)
    assert token_ids(llm.generate(PROMPTS, PARAMS, use_tqdm=False)) == alone
    stats = llm.llm_engine.stats()
    if "kv_cache_memory_bytes" in engine_args:
        assert stats.num_preemptions_total > 0
    if "kv_cache_memory_bytes" in engine_args:
        swapped = llm.llm_engine.scheduler.num_swap_outs
        assert swapped > 0 if "swap_space" in engine_args else swapped == 0
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_prefix_caching_on_and_off_give_the_same_tokens(make_llm):
    cached, uncached = make_llm(), make_llm(enable_prefix_caching=False)
    params = [GREEDY] * len(SHARED)
    first = token_ids(cached.generate(SHARED, params, use_tqdm=False))
    again = token_ids(cached.generate(SHARED, params, use_tqdm=False))
    reference = token_ids(uncached.generate(SHARED, params, use_tqdm=False))
    assert first == again == reference
    stats = cached.llm_engine.stats()
    assert stats.prefix_cache_hits_total >= 20 * len(SHARED)  # the second pass reuses whole prompts
    assert uncached.llm_engine.stats().prefix_cache_hits_total == 0


def test_kv_waste_stays_under_one_partial_block_per_sequence_and_blocks_come_back(make_llm):
    llm = make_llm(kv_cache_memory_bytes=100 * 1024)
    engine = llm.llm_engine
    for i, (prompt, params) in enumerate(zip(PROMPTS, PARAMS, strict=True)):
        engine.add_request(f"r{i}", prompt, params)
    block_size = engine.config.block_size
    while engine.has_unfinished_requests():
        engine.step()
        stats = engine.stats()
        assert stats.kv_waste_slots <= (block_size - 1) * stats.num_running
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert not any(engine.kv.ref_counts)


def test_abort_frees_blocks_and_reports_abort(make_llm):
    engine = make_llm().llm_engine
    for i, prompt in enumerate(PROMPTS[:6]):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=50, ignore_eos=True, n=2))
    for _ in range(3):
        engine.step()
    assert engine.kv.num_free_blocks < engine.kv.num_blocks
    outputs = [engine.abort_request(f"r{i}") for i in range(6)]
    assert all(c.finish_reason == "abort" for o in outputs for c in o.outputs)
    assert engine.kv.num_free_blocks == engine.kv.num_blocks and not engine.has_unfinished_requests()
    assert engine.abort_request("r0") is None


def test_max_tokens_and_max_model_len_end_with_length(make_llm):
    llm = make_llm()
    (out,) = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"
    long_prompt = random_prompts(1, 120, 120)[0]
    (out,) = llm.generate([long_prompt], SamplingParams(max_tokens=None, ignore_eos=True), use_tqdm=False)
    assert len(long_prompt) + len(out.outputs[0].token_ids) == 128 and out.outputs[0].finish_reason == "length"


def test_stop_token_ids_end_generation_and_stay_in_the_tokens(make_llm, alone):
    llm = make_llm()
    reference = alone[1]
    stop = reference[4]
    (out,) = llm.generate(
        [PROMPTS[1]],
        SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop], ignore_eos=True),
        use_tqdm=False,
    )
    first = reference.index(stop)
    assert out.outputs[0].token_ids == reference[: first + 1]
    assert (out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("stop", stop)


def test_logit_bias_steers_the_tokens_and_ids_past_the_vocabulary_are_refused(make_llm, alone):
    llm = make_llm()
    forced = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={"42": 100})
    (out,) = llm.generate([PROMPTS[1]], forced, use_tqdm=False)
    assert out.outputs[0].token_ids == [42] * 6
    first = alone[1][0]
    banned = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, logit_bias={str(first): -100})
    (out,) = llm.generate([PROMPTS[1]], banned, use_tqdm=False)
    assert out.outputs[0].token_ids[0] != first
    vocab = llm.llm_engine.vocab_size
    with pytest.raises(SamplingParamsError, match=rf"logit_bias: token ids \[{vocab}\] are outside"):
        llm.generate([PROMPTS[1]], SamplingParams(logit_bias={str(vocab): 1}), use_tqdm=False)


def test_stop_strings_cut_the_text(make_llm):
    llm = make_llm()
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompt = "Hello, my name is"
    full = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].text
    stop = full[6:8]
    (out,) = llm.generate(
        [prompt],
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop, "never appears"]),
        use_tqdm=False,
    )
    assert out.outputs[0].text == full[: full.index(stop)]
    assert (out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("stop", stop)


def test_eos_min_tokens_and_ignore_eos(make_llm):
    llm = make_llm()
    eos = llm.get_tokenizer().eos_token_id
    candidates = random_prompts(96, 4, 20, seed=1)
    runs = token_ids(
        llm.generate(candidates, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    )
    hit = next(i for i, tokens in enumerate(runs) if eos in tokens[1:20])  # the fixture's weights are fixed
    at = runs[hit].index(eos, 1)
    (stopped,) = llm.generate([candidates[hit]], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert stopped.outputs[0].token_ids == runs[hit][: at + 1]
    assert (stopped.outputs[0].finish_reason, stopped.outputs[0].stop_reason) == ("stop", None)
    (held,) = llm.generate(
        [candidates[hit]], SamplingParams(temperature=0, max_tokens=24, min_tokens=at + 3), use_tqdm=False
    )
    assert eos not in held.outputs[0].token_ids[: at + 3]
    assert len(held.outputs[0].token_ids) >= at + 3


def test_parallel_sampling_forks_share_the_prompt_and_match_single_seeded_runs(make_llm):
    llm = make_llm()
    prompt = PROMPTS[5]  # not a multiple of the block size: the forks share a partial block (copy-on-write)
    assert len(prompt) % 4
    many = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    (out,) = llm.generate([prompt], many, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    singles = [SamplingParams(temperature=1.0, seed=7 + i, max_tokens=10, ignore_eos=True) for i in range(3)]
    expected = token_ids(make_llm(enable_prefix_caching=False).generate([prompt] * 3, singles, use_tqdm=False))
    assert [c.token_ids for c in out.outputs] == expected
    assert len({tuple(t) for t in expected}) == 3


def test_seeds_reproduce_across_engines(make_llm):
    params = [seeded(i) for i in range(6)]
    first = token_ids(make_llm().generate(PROMPTS[:6], params, use_tqdm=False))
    second = token_ids(make_llm(seed=123).generate(PROMPTS[:6][::-1], params[::-1], use_tqdm=False))[::-1]
    assert first == second


def test_logprobs_match_transformers(make_llm, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    llm = make_llm()
    prompt = PROMPTS[2]
    (out,) = llm.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True), use_tqdm=False
    )
    completion = out.outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids = torch.tensor([prompt + completion.token_ids])
    expected = torch.log_softmax(hf(ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
    assert len(completion.logprobs) == 6
    for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
        assert list(entry) == expected[step].topk(3).indices.tolist()  # greedy: the sampled token first, rank 1
        assert entry[token].rank == 1
        assert entry[token].logprob == pytest.approx(expected[step, token].item(), abs=1e-4)
        assert entry[token].decoded_token == llm.get_tokenizer().decode([token])
    assert completion.cumulative_logprob == pytest.approx(
        sum(e[t].logprob for t, e in zip(completion.token_ids, completion.logprobs, strict=True))
    )


def test_stream_yields_growing_outputs_ending_in_the_generate_result(make_llm):
    llm = make_llm()
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    final = llm.generate(["你好，世界！"], params, use_tqdm=False)[0].outputs[0]
    texts, last = [], None
    for output in llm.stream(["你好，世界！"], params):
        texts.append(output.outputs[0].text)
        last = output
    assert last.finished and last.outputs[0].token_ids == final.token_ids and texts[-1] == final.text
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    assert last.metrics.first_token_time <= last.metrics.last_token_time <= last.metrics.finished_time
    assert len(last.metrics.token_times) == 12


def test_chat_renders_the_template(make_llm):
    llm = make_llm()
    messages = [{"role": "user", "content": "Hello"}]
    (out,) = llm.chat(messages, SamplingParams(max_tokens=2), use_tqdm=False)
    assert out.prompt == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert out.prompt_token_ids == llm.get_tokenizer().encode(out.prompt)


def test_bad_prompts_are_clear_errors(make_llm):
    llm = make_llm()
    with pytest.raises(InvalidPromptError, match="200 tokens, but max_model_len is 128"):
        llm.generate([[5] * 200], use_tqdm=False)
    with pytest.raises(InvalidPromptError, match="outside the vocabulary"):
        llm.generate([[10**6]], use_tqdm=False)
    with pytest.raises(ValueError, match="sampling_params: got 2 for 1 prompts"):
        llm.generate(["a"], [SamplingParams(), SamplingParams()], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_bad_llm_arguments_get_the_compilers_diagnostics(tiny_llama_dir):
    from vdeploy.compiler import PlanError
    from vdeploy_engine import LLM

    with pytest.raises(PlanError, match="block_size"):
        LLM(str(tiny_llama_dir), block_size=3)
    with pytest.raises(PlanError, match="did you mean 'max_num_seqs'"):
        LLM(str(tiny_llama_dir), max_num_seq=4)


def test_profile_run_runs_the_largest_step_without_touching_the_cache(make_llm):
    llm = make_llm()
    runner = llm.llm_engine.runner
    caches = [(layer.k_cache, layer.v_cache) for layer in runner.attn_layers]
    assert runner.profile_run() > 0  # the bytes its step allocated at the peak
    assert all(
        layer.k_cache is k and layer.v_cache is v for layer, (k, v) in zip(runner.attn_layers, caches, strict=True)
    )
    assert not any(k.any() for k, _ in caches)  # nothing was written
    assert len(llm.generate(["Hello"], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids) == 2


def test_streamed_text_never_shows_a_stop_string(make_llm):
    llm = make_llm()
    prompt = "Hello, my name is"
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    text = full[0].outputs[0].text
    stop = text[8:11]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=stop)
    streamed = [o.outputs[0].text for o in llm.stream([prompt], params)]
    final = text[: text.index(stop)]
    assert streamed[-1] == final
    assert all(final.startswith(t) for t in streamed)  # held back while it could be the start of the stop string


def test_closing_a_stream_early_aborts_the_rest(make_llm):
    llm = make_llm()
    stream = llm.stream(PROMPTS[:4], SamplingParams(max_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests() and engine.kv.num_free_blocks == engine.kv.num_blocks
