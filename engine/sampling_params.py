"""SamplingParams: how one request is decoded (vLLM's names and semantics). Torch-free, so the server can validate
request bodies before touching the engine."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

_GREEDY_EPSILON = 1e-5  # temperatures below this decode greedily, as in vLLM
# A seed must fit torch's 64-bit generator after the sequence index (< 128 choices) is added to it; vLLM takes the
# range of a signed 64-bit integer.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a logit bias; vLLM clamps biases into it
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class StructuredOutputs:
    """vLLM's StructuredOutputsParams: exactly one constraint on the output, enforced by token masks (the engine's
    grammar library is xgrammar). `grammar` is EBNF in xgrammar's (GBNF-like) syntax."""

    json: str | dict | None = None  # a JSON schema (object or its text)
    regex: str | None = None
    choice: list[str] | None = None  # the output is exactly one of these strings
    grammar: str | None = None
    json_object: bool = False  # any JSON object

    def __post_init__(self) -> None:
        given = [n for n in ("json", "regex", "choice", "grammar") if getattr(self, n) is not None] + (
            ["json_object"] if self.json_object else []
        )
        if len(given) != 1:
            found = ", ".join(given) or "none"
            raise SamplingParamsError("structured_outputs", f"give exactly one constraint, got {found}")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise SamplingParamsError("structured_outputs", "choice must be a non-empty list of strings")

    @property
    def key(self) -> tuple[str, str]:
        """(kind, text): what identifies the compiled grammar."""
        if self.json is not None:
            text = self.json if isinstance(self.json, str) else json.dumps(self.json)
            return "json", text
        if self.choice is not None:
            return "choice", json.dumps(self.choice)
        for kind in ("regex", "grammar"):
            if getattr(self, kind) is not None:
                return kind, getattr(self, kind)
        return "json_object", ""


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = all tokens
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = 16  # None = up to max_model_len
    min_tokens: int = 0
    stop: str | list[str] | None = None  # strings that end generation; not included in the output
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # number of top logprobs per generated token (plus the sampled one)
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None
    logit_bias: dict[int, float] | None = None  # added to these token ids' logits (JSON sends the ids as text)
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias is not None:
            self.logit_bias = _checked_logit_bias(self.logit_bias)
        for name in _FLOAT_FIELDS:  # NaN passes every range check below, and inf turns logits into NaN
            if not math.isfinite(getattr(self, name)):
                raise SamplingParamsError(name, f"must be a finite number, got {getattr(self, name)}")
        checks = [
            ("n", self.n >= 1, f"must be >= 1, got {self.n}"),
            ("temperature", self.temperature >= 0, f"must be >= 0, got {self.temperature}"),
            ("top_p", 0 < self.top_p <= 1, f"must be in (0, 1], got {self.top_p}"),
            ("top_k", self.top_k >= 0, f"must be -1, 0 (all tokens) or positive, got {self.top_k}"),
            ("min_p", 0 <= self.min_p <= 1, f"must be in [0, 1], got {self.min_p}"),
            ("repetition_penalty", self.repetition_penalty > 0, f"must be > 0, got {self.repetition_penalty}"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, f"must be in [-2, 2], got {self.presence_penalty}"),
            (
                "frequency_penalty",
                -2 <= self.frequency_penalty <= 2,
                f"must be in [-2, 2], got {self.frequency_penalty}",
            ),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, f"must be >= 1, got {self.max_tokens}"),
            ("min_tokens", self.min_tokens >= 0, f"must be >= 0, got {self.min_tokens}"),
            (
                "min_tokens",
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                f"({self.min_tokens}) must be <= max_tokens ({self.max_tokens})",
            ),
            ("stop", all(isinstance(s, str) and s for s in self.stop_strings), "must be non-empty strings"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "must be token ids"),
            (
                "seed",
                self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
                f"must fit a signed 64-bit integer ({SEED_MIN}..{SEED_MAX}), got {self.seed}",
            ),
            ("logprobs", self.logprobs is None or self.logprobs >= 0, f"must be >= 0, got {self.logprobs}"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise SamplingParamsError(name, message)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPSILON

    @property
    def argmax_only(self) -> bool:
        """The next token is the argmax of the raw logits: greedy, no logprobs, no penalties (what a decode graph
        computes by itself, no token mask)."""
        return (
            self.greedy
            and self.logprobs is None
            and not self.has_penalties
            and self.structured_outputs is None
            and not self.logit_bias
        )

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _checked_logit_bias(bias: dict) -> dict[int, float]:
    """{token id: bias} with int ids (a JSON object's keys are text) and each bias clamped to +-LOGIT_BIAS_LIMIT, as
    vLLM does; whether the ids are in the vocabulary is the engine's check (it knows the model)."""
    checked = {}
    for token, value in bias.items():
        digits = isinstance(token, str) and token.isascii() and token.isdigit() and len(token) < 20
        if not (digits or (type(token) is int and token >= 0)):
            raise SamplingParamsError("logit_bias", f"keys must be token ids (non-negative integers), got {token!r}")
        if type(value) not in (int, float) or not math.isfinite(value):
            raise SamplingParamsError("logit_bias", f"the bias of token {token} must be a finite number, got {value!r}")
        checked[int(token)] = min(LOGIT_BIAS_LIMIT, max(-LOGIT_BIAS_LIMIT, float(value)))
    return checked
