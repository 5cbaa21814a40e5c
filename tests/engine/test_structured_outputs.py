"""Structured outputs in the engine: token masks keep a sampled sequence inside its grammar, even on a random model,
and leave the other sequences of the batch as they would be alone."""

from __future__ import annotations

import json
import re

import pytest

from vdeploy_engine import SamplingParams
from vdeploy_engine.sampling_params import SamplingParamsError, StructuredOutputs

PROMPT = "Hello, my name is"


@pytest.fixture(scope="module")
def llm(make_llm):
    return make_llm()


def _texts(llm, params: list[SamplingParams]) -> list[str]:
    return [o.outputs[0].text for o in llm.generate([PROMPT] * len(params), params, use_tqdm=False)]


def test_random_model_samples_stay_inside_the_grammar(llm):
    regex = r"(ab|c)[0-9]{2}x"
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
        "required": ["n", "ok"],
    }
    constraints = [
        (StructuredOutputs(regex=regex), lambda t: re.fullmatch(regex, t)),
        (StructuredOutputs(choice=["red", "green", "blue"]), lambda t: t in ("red", "green", "blue")),
        (StructuredOutputs(grammar='root ::= "(" [a-z] ")"'), lambda t: re.fullmatch(r"\([a-z]\)", t)),
        (StructuredOutputs(json=schema), lambda t: set(json.loads(t)) == {"n", "ok"}),
    ]
    for constraint, check in constraints:
        params = [
            SamplingParams(temperature=1.0, seed=seed, max_tokens=60, structured_outputs=constraint)
            for seed in range(4)
        ]
        for text in _texts(llm, params):
            assert check(text), (constraint, text)


def test_a_constrained_neighbour_changes_nothing_for_the_others(llm):
    free = [SamplingParams(temperature=0, max_tokens=12), SamplingParams(temperature=0.8, seed=5, max_tokens=12)]
    alone = _texts(llm, free)
    constrained = SamplingParams(temperature=0, max_tokens=12, structured_outputs=StructuredOutputs(regex="[xyz]+"))
    together = _texts(llm, [free[0], constrained, free[1]])
    assert [together[0], together[2]] == alone
    assert re.fullmatch("[xyz]+", together[1])


def test_parallel_samples_each_follow_the_grammar(llm):
    params = SamplingParams(
        n=3, temperature=1.0, seed=2, max_tokens=20, structured_outputs=StructuredOutputs(regex="[0-9]{3}")
    )
    [output] = llm.generate([PROMPT], params, use_tqdm=False)
    assert len(output.outputs) == 3 and all(re.fullmatch("[0-9]{3}", o.text) for o in output.outputs)


def test_bad_constraints_are_refused_before_generation(llm):
    with pytest.raises(SamplingParamsError, match="exactly one"):
        StructuredOutputs(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="invalid regex"):
        llm.generate([PROMPT], SamplingParams(structured_outputs=StructuredOutputs(regex="(")), use_tqdm=False)
