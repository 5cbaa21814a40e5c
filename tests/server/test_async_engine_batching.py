"""AsyncEngine's serving behaviour on the tiny random Llama: a burst of requests reaching an idle engine starts as one
batch, while a lone request is not held back."""

from __future__ import annotations

import asyncio

import pytest
import torch

from vdeploy_engine import LLM, SamplingParams
from vdeploy_engine import async_engine as async_engine_module
from vdeploy_engine.async_engine import AsyncEngine

MAX_NUM_SEQS = 4


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model is all synchronisation with more threads
    llm = LLM(str(tiny_llama_dir), dtype="float32", max_model_len=64, block_size=4, max_num_seqs=MAX_NUM_SEQS)
    engine = AsyncEngine.from_engine(llm.llm_engine)
    asyncio.run(_first_outputs(engine, [0.0], "warm-up"))  # a step has run: the engine knows its step time
    yield engine
    engine.shutdown()
    torch.set_num_threads(threads)


async def _first_outputs(engine: AsyncEngine, delays: list[float], name: str) -> list:
    """Sends one request after each delay (seconds since the previous one); returns every request's last output."""

    async def one(index: int):
        async for output in engine.generate([5, 6, 7, index + 8], SamplingParams(max_tokens=2), f"{name}-{index}"):
            final = output
        return final

    tasks = []
    for index, delay in enumerate(delays):
        await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index)))
    return await asyncio.gather(*tasks)


GENEROUS_GAP_S = 30.0  # a batch that waited for this would be unmistakable, however busy the machine


def _generous_coalescing(monkeypatch) -> None:
    monkeypatch.setattr(async_engine_module, "ARRIVAL_GAP_STEPS", 1e9)
    monkeypatch.setattr(async_engine_module, "MAX_ARRIVAL_GAP_S", GENEROUS_GAP_S)
    monkeypatch.setattr(async_engine_module, "ARRIVAL_WINDOW_STEPS", 1e9)


def test_a_burst_at_an_idle_engine_starts_as_one_batch(engine, monkeypatch):
    _generous_coalescing(monkeypatch)
    # Arrivals 30 ms apart: each step of the tiny model takes a few ms, so without coalescing the first request would
    # run alone (and finish) before the next arrived. The fourth fills the batch, which then starts at once.
    outputs = asyncio.run(_first_outputs(engine, [0.0] + [0.03] * (MAX_NUM_SEQS - 1), "burst"))
    assert len({o.metrics.first_scheduled_time for o in outputs}) == 1
    assert len({o.metrics.first_token_time for o in outputs}) == 1


def test_a_full_batch_starts_without_waiting_for_more(engine, monkeypatch):
    _generous_coalescing(monkeypatch)
    outputs = asyncio.run(_first_outputs(engine, [0.0] * MAX_NUM_SEQS, "full"))
    last_arrival = max(o.metrics.arrival_time for o in outputs)
    assert outputs[0].metrics.first_scheduled_time - last_arrival < GENEROUS_GAP_S / 2  # not the gap


def _scheduling_wait(engine, name: str) -> float:
    (output,) = asyncio.run(_first_outputs(engine, [0.0], name))
    return output.metrics.first_scheduled_time - output.metrics.arrival_time


def test_a_lone_request_is_not_held_back(engine, monkeypatch):
    """A lone request waits at most MAX_ARRIVAL_GAP_S for company, on top of what reaching the engine's thread costs
    on this machine now: that cost is measured first with coalescing off, and allowed twice over."""
    gap = async_engine_module.MAX_ARRIVAL_GAP_S
    with monkeypatch.context() as off:
        off.setattr(async_engine_module, "MAX_ARRIVAL_GAP_S", 0.0)
        baseline = max(_scheduling_wait(engine, f"baseline-{i}") for i in range(3))
    assert _scheduling_wait(engine, "lone") <= gap + 2 * baseline + 0.05
