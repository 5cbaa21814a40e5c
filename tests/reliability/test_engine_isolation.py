"""The engine loop survives what one request does to it: a step that raises fails that step's requests (their
clients get the error) and the loop serves the next request; only a device fault stops it, and says so."""

from __future__ import annotations

import asyncio

import pytest

from vdeploy_engine import SamplingParams
from vdeploy_engine.async_engine import AsyncEngine, EngineDeadError, RequestFailedError
from vdeploy_engine.core.engine import is_device_fault
from vdeploy_engine.sampling_params import SamplingParamsError

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


async def collect(engine: AsyncEngine, prompt, params: SamplingParams, request_id: str) -> list:
    return [output async for output in engine.generate(prompt, params, request_id)]


def fail_sampling_for(engine: AsyncEngine, request_id: str, error: Exception) -> None:
    """Makes the sampler raise `error` whenever `request_id` is in the batch (a fault injected into one request)."""
    runner = engine.engine.runner
    sample = runner.sample

    def poisoned(logits, seqs, *rest):
        if any(seq.request.request_id == request_id for seq in seqs):
            raise error
        return sample(logits, seqs, *rest)

    runner.sample = poisoned


@pytest.fixture
def engine(tiny_llm):
    fatal: list[BaseException] = []
    engine = AsyncEngine.from_engine(tiny_llm.llm_engine)
    engine._on_fatal = fatal.append
    engine.fatal = fatal
    yield engine
    engine.shutdown()
    tiny_llm.llm_engine.runner.__dict__.pop("sample", None)


def test_a_request_that_raises_fails_alone_and_the_next_one_is_served(engine):
    fail_sampling_for(engine, "poison", IndexError("index 1000000000 is out of bounds for dimension 1"))

    async def run():
        with pytest.raises(RequestFailedError, match="IndexError: index 1000000000"):
            await collect(engine, [5, 6, 7], SamplingParams(max_tokens=8), "poison")
        return await collect(engine, [5, 6, 7], GREEDY, "after")

    outputs = asyncio.run(run())
    assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 6
    assert engine.is_running() and not engine.fatal
    kv = engine.engine.kv
    assert kv.num_free_blocks == kv.num_blocks and not engine.engine.has_unfinished_requests()


def test_a_failure_after_tokens_were_streamed_is_isolated_too(engine):
    """The fault strikes while the engine takes the request's third token, after two reached its client."""
    runner = engine.engine.runner
    take_samples = engine.engine._take_samples
    calls = {"n": 0}

    def take_then_fail(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("detokenizer bug")
        return take_samples(*args)

    engine.engine._take_samples = take_then_fail

    async def run():
        seen = []
        with pytest.raises(RequestFailedError, match="detokenizer bug"):
            async for output in engine.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=50), "mid"):
                seen.append(output)
        del engine.engine._take_samples
        return seen, await collect(engine, [8, 9], GREEDY, "next")

    seen, after = asyncio.run(run())
    assert len(seen) == 2 and after[-1].finished and engine.is_running()
    assert runner is engine.engine.runner and engine.engine.kv.num_free_blocks == engine.engine.kv.num_blocks


def test_params_the_model_cannot_honour_are_refused_before_queueing(engine):
    for params, field in [
        (SamplingParams(stop_token_ids=[10**9], min_tokens=2), "stop_token_ids"),
        (SamplingParams(logprobs=10**6), "logprobs"),
    ]:
        with pytest.raises(SamplingParamsError) as refused:
            asyncio.run(collect(engine, [5, 6], params, "bad"))
        assert refused.value.field == field
    with pytest.raises(SamplingParamsError, match="seed: must fit a signed 64-bit integer"):
        SamplingParams(seed=2**64)
    with pytest.raises(SamplingParamsError, match="temperature: must be a finite number"):
        SamplingParams(temperature=float("nan"))
    assert engine.is_running()


def test_a_device_fault_stops_the_loop_and_calls_on_fatal(engine):
    fault = RuntimeError("CUDA error: an illegal memory access was encountered")
    assert is_device_fault(fault) and not is_device_fault(IndexError("out of range"))
    fail_sampling_for(engine, "victim", fault)

    async def run():
        with pytest.raises(EngineDeadError):
            await collect(engine, [5, 6, 7], SamplingParams(max_tokens=4), "victim")
        with pytest.raises(EngineDeadError):  # later requests are refused at once, not queued for ever
            await collect(engine, [5], GREEDY, "later")

    asyncio.run(run())
    assert engine.fatal == [fault] and not engine.is_running()
