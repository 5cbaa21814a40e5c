"""AsyncEngine: streaming from a background engine loop, abort, errors a client causes, stats."""

from __future__ import annotations

import asyncio

import pytest

from vdeploy_engine import SamplingParams
from vdeploy_engine.async_engine import AsyncEngine, InvalidPromptError


@pytest.fixture(scope="module")
def async_engine(make_llm):
    engine = AsyncEngine.from_engine(make_llm().llm_engine)
    yield engine
    engine.shutdown()


async def collect(engine: AsyncEngine, prompt, params: SamplingParams, request_id: str) -> list:
    return [output async for output in engine.generate(prompt, params, request_id)]


def test_concurrent_streams_match_offline_generation(async_engine, make_llm):
    prompts = ["Hello, my name is", "你好，世界！", "The capital of France is"]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = [o.outputs[0] for o in make_llm().generate(prompts, params, use_tqdm=False)]

    async def run():
        return await asyncio.gather(*(collect(async_engine, p, params, f"s{i}") for i, p in enumerate(prompts)))

    streams = asyncio.run(run())
    for stream, final in zip(streams, expected, strict=True):
        assert [o.finished for o in stream] == [False] * (len(stream) - 1) + [True]
        assert stream[-1].outputs[0].token_ids == final.token_ids and stream[-1].outputs[0].text == final.text
        assert len(stream) == 10  # one output per generated token
        metrics = stream[-1].metrics
        assert metrics.arrival_time <= metrics.first_token_time <= metrics.finished_time
    stats = async_engine.stats()
    assert stats.generation_tokens_total >= 30 and stats.num_running == 0
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_abort_ends_the_stream_and_frees_blocks(async_engine):
    async def run():
        seen = []
        async for output in async_engine.generate(
            [5, 6, 7, 8, 9], SamplingParams(max_tokens=100, ignore_eos=True), "a"
        ):
            seen.append(output)
            if len(seen) == 3:
                await async_engine.abort("a")
        return seen

    seen = asyncio.run(run())
    assert seen[-1].finished and seen[-1].outputs[0].finish_reason == "abort"
    assert len(seen[-1].outputs[0].token_ids) < 100
    engine = async_engine.engine
    assert engine.kv.num_free_blocks == engine.kv.num_blocks and not engine.has_unfinished_requests()


def test_closing_a_stream_early_aborts_its_request(async_engine):
    async def run():
        stream = async_engine.generate([5, 6, 7], SamplingParams(max_tokens=100, ignore_eos=True), "c")
        await stream.__anext__()
        await stream.aclose()
        for _ in range(100):  # the abort is applied by the engine thread
            if not async_engine.engine.has_unfinished_requests():
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(run())


def test_client_errors_raise_value_errors_before_anything_runs(async_engine):
    with pytest.raises(InvalidPromptError, match="300 tokens, but max_model_len is 128"):
        asyncio.run(collect(async_engine, [5] * 300, SamplingParams(), "long"))
    assert issubclass(InvalidPromptError, ValueError)
    assert async_engine.is_running()


def test_a_crashed_engine_loop_fails_every_stream(make_llm):
    from vdeploy_engine.async_engine import EngineDeadError

    llm_engine = make_llm().llm_engine
    engine = AsyncEngine.from_engine(llm_engine)

    def crash(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    llm_engine.runner.execute = crash  # a fault inside a step
    with pytest.raises(EngineDeadError) as info:
        asyncio.run(collect(engine, "Hello", SamplingParams(), "x"))
    assert "illegal memory access" in str(info.value.__cause__)
    assert not engine.is_running()
    with pytest.raises(EngineDeadError):  # later requests fail at once instead of hanging
        asyncio.run(collect(engine, "Hello", SamplingParams(), "y"))
