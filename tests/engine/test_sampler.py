"""The sampler on hand-made logits: each SamplingParams knob changes what can be drawn, as in vLLM."""

import math

import pytest
import torch

from vdeploy_engine.core.sequence import Request
from vdeploy_engine.sampling_params import SamplingParams, SamplingParamsError
from vdeploy_engine.worker.sampler import Sampler

VOCAB = 8


def seqs_for(*params: SamplingParams, prompt=(1, 2, 3), outputs=()):
    seqs = []
    for i, p in enumerate(params):
        seq = Request(str(i), None, list(prompt), p, tokenizer=None).seqs[0]
        seq.token_ids += list(outputs)
        seqs.append(seq)
    return seqs


def draw(params: SamplingParams, logits: torch.Tensor, times: int = 200, seed: int = 0, **kw) -> set[int]:
    sampler = Sampler(torch.device("cpu"), seed)
    seqs = seqs_for(*[params] * times, **kw)
    return set(sampler(logits.repeat(times, 1), seqs, [set()] * times).token_ids)


LOGITS = torch.tensor([[4.0, 3.5, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0]])


def test_greedy_takes_the_argmax():
    assert draw(SamplingParams(temperature=0), LOGITS) == {0}


def test_temperature_samples_widely_and_top_k_top_p_min_p_narrow_it():
    assert len(draw(SamplingParams(temperature=1.0), LOGITS)) >= 5
    assert draw(SamplingParams(temperature=1.0, top_k=2), LOGITS) == {0, 1}
    # Probabilities ~ .47 .29 .17 .06 ...: the nucleus for 0.7 is {0, 1} (the mass before token 1 is .47 < .7).
    assert draw(SamplingParams(temperature=1.0, top_p=0.7), LOGITS) == {0, 1}
    # min_p 0.5 keeps tokens at least half as likely as the top one: e^-0.5 = .61 ok, e^-1 = .37 not.
    assert draw(SamplingParams(temperature=1.0, min_p=0.5), LOGITS) == {0, 1}


def test_seeded_requests_repeat_whatever_else_is_in_the_batch():
    sampler_a, sampler_b = Sampler(torch.device("cpu"), 1), Sampler(torch.device("cpu"), 2)
    params = SamplingParams(temperature=1.0, seed=1234)
    other = SamplingParams(temperature=1.0)
    flat = torch.zeros(1, VOCAB)
    alone = [sampler_a(flat, [s], [set()]).token_ids[0] for s in seqs_for(*[params] * 1) for _ in range(20)]
    (seq,) = seqs_for(params)
    mixed = []
    for _ in range(20):
        batch = seqs_for(other, other) + [seq]
        mixed.append(sampler_b(flat.repeat(3, 1), batch, [set()] * 3).token_ids[2])
    assert alone == mixed and len(set(alone)) > 2


def test_min_tokens_masks_stop_ids():
    (seq,) = seqs_for(SamplingParams(temperature=0))
    out = Sampler(torch.device("cpu"), 0)(LOGITS.clone(), [seq], [{0}])
    assert out.token_ids == [1]


def test_logit_bias_shifts_logits_after_the_raw_logprobs_and_is_clamped():
    assert draw(SamplingParams(temperature=0, logit_bias={"5": 4.5}), LOGITS) == {5}  # 0 + 4.5 > 4
    assert draw(SamplingParams(temperature=0, logit_bias={0: -0.6}), LOGITS) == {1}  # 3.4 < 3.5
    assert draw(SamplingParams(temperature=1.0, logit_bias={"7": 100}), LOGITS) == {7}
    assert SamplingParams(logit_bias={"3": 1e6, "4": -1e6}).logit_bias == {3: 100.0, 4: -100.0}  # vLLM's clamp
    (seq,) = seqs_for(SamplingParams(temperature=0, logprobs=0, logit_bias={"6": 50}))
    out = Sampler(torch.device("cpu"), 0)(LOGITS.clone(), [seq], [set()])
    assert out.token_ids == [6] and out.logprobs[0][0][1] == pytest.approx(float(torch.log_softmax(LOGITS[0], -1)[6]))
    assert not SamplingParams(temperature=0, logit_bias={"1": 1}).argmax_only  # the decode graph's argmax ignores it


def test_penalties_push_away_from_seen_tokens():
    seen = dict(prompt=(5,), outputs=(0, 0))
    assert draw(SamplingParams(temperature=0, frequency_penalty=1.0), LOGITS, **seen) == {1}  # 4 - 2 < 3.5
    assert draw(SamplingParams(temperature=0, presence_penalty=0.4), LOGITS, **seen) == {0}  # 4 - .4 > 3.5
    assert draw(SamplingParams(temperature=0, presence_penalty=0.6), LOGITS, **seen) == {1}
    # Repetition penalty divides a positive logit: 4 / 1.2 = 3.33 < 3.5; it also covers prompt tokens.
    assert draw(SamplingParams(temperature=0, repetition_penalty=1.2), LOGITS, **seen) == {1}
    logits = torch.tensor([[0.0, 0, 0, 0, 0, 3.0, 2.9, 0]])
    assert draw(SamplingParams(temperature=0, repetition_penalty=1.1), logits, **seen) == {6}


def test_logprobs_are_raw_log_softmax_with_ranks():
    (seq,) = seqs_for(SamplingParams(temperature=0, logprobs=2, frequency_penalty=1.0), outputs=(0,))
    out = Sampler(torch.device("cpu"), 0)(LOGITS.clone(), [seq], [set()])
    expected = torch.log_softmax(LOGITS[0], -1)
    sampled, *top = out.logprobs[0]
    assert sampled[0] == 1 and sampled[2] == 2  # the penalty made token 1 win; it is the 2nd most likely raw
    assert math.isclose(sampled[1], expected[1].item(), rel_tol=1e-6)
    assert [(t, r) for t, _, r in top] == [(0, 1)]  # top-2 minus the sampled token


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(n=0), "n"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(stop=[""]), "stop"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(logprobs=-1), "logprobs"),
        (dict(logit_bias={"-1": 1.0}), "logit_bias"),
        (dict(logit_bias={"a": 1.0}), "logit_bias"),
        (dict(logit_bias={"1": float("nan")}), "logit_bias"),
        (dict(logit_bias={"9" * 40: 1.0}), "logit_bias"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(SamplingParamsError, match=f"^{field}:") as info:
        SamplingParams(**kwargs)
    assert info.value.field == field
