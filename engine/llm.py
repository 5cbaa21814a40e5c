"""`LLM`: offline batch inference with vLLM's interface — `from vdeploy_engine import LLM, SamplingParams`.

    llm = LLM(model="path/to/model.gguf", max_model_len=2048)
    outputs = llm.generate(["Hello, my name is"], SamplingParams(temperature=0.8, max_tokens=32))
    outputs[0].outputs[0].text

Arguments go through the compiler (`engine_config_from_args`), so they get the same checks as `vdeploy lint`. `stream()`
yields cumulative outputs step by step.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from vdeploy_engine.config import EngineConfig
from vdeploy_engine.core.engine import LLMEngine
from vdeploy_engine.outputs import RequestOutput
from vdeploy_engine.sampling_params import SamplingParams

PromptInput = str | list[int] | dict[str, Any]  # text, token ids, or {"prompt": ...} / {"prompt_token_ids": ...}
Conversation = list[dict[str, Any]]

logger = logging.getLogger(__name__)


class LLM:
    def __init__(self, model: str, **kwargs: Any):
        config = engine_config_from_args(model, **kwargs)
        self.llm_engine = LLMEngine.from_config(config)
        self._request_ids = itertools.count()

    @property
    def config(self) -> EngineConfig:
        return self.llm_engine.config

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generates for every prompt; returns one finished RequestOutput per prompt, in input order."""
        request_ids = self._add_requests(prompts, sampling_params)
        finished: dict[str, RequestOutput] = {}
        progress = _progress_bar(len(request_ids)) if use_tqdm else None
        try:
            while self.llm_engine.has_unfinished_requests():
                for output in self.llm_engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        if progress is not None:
                            progress.update(1)
        finally:
            if progress is not None:
                progress.close()
            self._abort_unfinished(request_ids)
        return [finished[rid] for rid in request_ids]

    def stream(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Iterator[RequestOutput]:
        """Yields a cumulative RequestOutput each time a request progresses, interleaved across prompts (match them by
        `request_id`; requests are numbered in submission order). Closing the iterator early aborts the rest."""
        request_ids = self._add_requests(prompts, sampling_params)
        try:
            while self.llm_engine.has_unfinished_requests():
                yield from self.llm_engine.step()
        finally:
            self._abort_unfinished(request_ids)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Generates a reply to each conversation, rendered through the chat template: `chat_template` (a path or a
        Jinja string) if given, else the config's, else the model's own."""
        from vdeploy_engine.loader.tokenizer import read_chat_template

        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        template = read_chat_template(chat_template) if chat_template else None
        tokenizer = self.get_tokenizer()
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(
                conversation, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _add_requests(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
    ) -> list[str]:
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        elif len(params) != len(prompts):
            raise ValueError(f"sampling_params: got {len(params)} for {len(prompts)} prompts (give one, or one each)")
        checked = [self._check(prompt) for prompt in prompts]  # every prompt is checked before any is queued
        request_ids = []
        for (text, token_ids), p in zip(checked, params, strict=True):
            request_id = str(next(self._request_ids))
            self.llm_engine.add_request(request_id, text, p, prompt_token_ids=token_ids)
            request_ids.append(request_id)
        return request_ids

    def _check(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                _, token_ids = self.llm_engine.check_prompt(prompt["prompt_token_ids"])
                return prompt.get("prompt"), token_ids
            prompt = prompt["prompt"]
        return self.llm_engine.check_prompt(prompt)

    def _abort_unfinished(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.llm_engine.abort_request(request_id)


def engine_config_from_args(model: str, **kwargs: Any) -> EngineConfig:
    """LLM(...) keyword arguments -> EngineConfig, through the planner installed under the entry-point group
    `vdeploy_engine.planner`: vdeploy registers its compiler there, so bad values raise its PlanError with the same
    diagnostics as `vdeploy lint`, and what is left open (dtype, max_model_len, the CPU KV cache size...) is decided
    there. The engine names no control-plane module (docs/DESIGN.md, "Import rules")."""
    from importlib.metadata import entry_points

    planners = entry_points(group="vdeploy_engine.planner")
    if not planners:
        raise RuntimeError("no planner is installed for LLM(...) arguments: install vdeploy (pip install vdeploy)")
    return next(iter(planners)).load()(model, **kwargs)


def _progress_bar(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="Processed prompts", unit="req", dynamic_ncols=True)
