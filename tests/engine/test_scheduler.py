"""The scheduler alone, driven the way the engine drives it (schedule, run, append a token)."""

from __future__ import annotations

from vdeploy_engine.config import EngineConfig
from vdeploy_engine.core.kv_cache import KVCacheManager
from vdeploy_engine.core.scheduler import Scheduler
from vdeploy_engine.core.sequence import Request, SeqStatus
from vdeploy_engine.sampling_params import SamplingParams


def make(num_blocks=64, **config):
    config = EngineConfig(model="m", block_size=4, **config)
    kv = KVCacheManager(num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching)
    return Scheduler(config, kv), kv


def add(scheduler, length, rid="r"):
    prompt = [sum(map(ord, rid)) * 100 + i for i in range(length)]  # requests share no prefix
    seq = Request(rid, None, prompt, SamplingParams(), tokenizer=None).seqs[0]
    scheduler.add(seq)
    return seq


def run_step(scheduler):
    """Schedules a step, 'runs' it and appends a token to every sequence whose prompt is done."""
    out = scheduler.schedule()
    scheduler.update(out)
    for seq, _ in out.scheduled:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(0)
    return out


def test_chunked_prefill_respects_the_token_budget_and_decodes_go_first():
    scheduler, _ = make(max_num_batched_tokens=16, max_num_seqs=4, max_model_len=64)
    first = add(scheduler, 10, "a")
    out = run_step(scheduler)
    assert out.scheduled == [(first, 10)]
    second = add(scheduler, 40, "b")
    out = run_step(scheduler)
    assert [(s.request.request_id, n) for s, n in out.scheduled] == [("a", 1), ("b", 15)]  # a chunk of b
    out = run_step(scheduler)
    assert [(s.request.request_id, n) for s, n in out.scheduled] == [("a", 1), ("b", 15)]
    out = run_step(scheduler)
    assert [(s.request.request_id, n) for s, n in out.scheduled] == [("a", 1), ("b", 10)]
    assert second.num_computed_tokens == 40 and second.num_tokens == 41


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    scheduler, _ = make(max_num_batched_tokens=64, max_model_len=64, enable_chunked_prefill=False)
    add(scheduler, 60, "a")
    add(scheduler, 30, "b")
    out = run_step(scheduler)
    assert [n for _, n in out.scheduled] == [60]
    out = run_step(scheduler)
    assert [n for _, n in out.scheduled] == [1, 30]


def test_at_most_max_num_seqs_run():
    scheduler, _ = make(max_num_seqs=2)
    seqs = [add(scheduler, 5, str(i)) for i in range(5)]
    run_step(scheduler)
    assert [s.status for s in seqs] == [SeqStatus.RUNNING] * 2 + [SeqStatus.WAITING] * 3


def test_out_of_blocks_preempts_the_newest_and_resumes_it_first():
    scheduler, kv = make(num_blocks=6, max_model_len=24)
    old, new = add(scheduler, 12, "old"), add(scheduler, 11, "new")
    run_step(scheduler)  # 3 blocks each: the cache is full
    run_step(scheduler)  # old needs a 4th block: new is preempted (recompute)
    assert (old.status, new.status) == (SeqStatus.RUNNING, SeqStatus.WAITING)
    assert new.num_computed_tokens == 0 and new.block_table == [] and scheduler.num_preemptions == 1
    assert new.num_tokens == 12  # its generated token is kept and will be recomputed
    scheduler.finish(old)
    out = run_step(scheduler)
    assert out.scheduled == [(new, 4)]  # its two full blocks come back from the prefix cache
    assert new.num_computed_tokens == 12 and kv.num_free_blocks == 6 - 3
