"""`LLM`: offline batch inference with vLLM's interface — `from engine import LLM, SamplingParams`.

    llm = LLM(model="path/to/model.gguf", max_model_len=2048)
    outputs = llm.generate(["Hello, my name is"], SamplingParams(temperature=0.8, max_tokens=32))
    outputs[0].outputs[0].text

Arguments go through the control plane's `plan_from_args` (when present), so they get the same checks as `vdeploy
lint`. `stream()` yields cumulative outputs step by step.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

PromptInput = str | list[int] | dict[str, Any]  # text, token ids, or {"prompt": ...} / {"prompt_token_ids": ...}
Conversation = list[dict[str, Any]]

_CPU_KV_CACHE_CAP = 1 << 30  # default CPU KV cache: room for every sequence at max_model_len, up to 1 GiB


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
        from engine.loader.tokenizer import read_chat_template

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
    """LLM(...) keyword arguments -> EngineConfig. Uses the control plane's compiler when it is installed, so bad
    values get the same diagnostics as `vdeploy lint`; otherwise fills `auto` values here."""
    try:
        from vdeploy.compiler import plan_from_args
    except ImportError:
        plan_from_args = None
    if plan_from_args is not None:
        return plan_from_args(model, **kwargs).engine

    import torch

    known = EngineConfig.__dataclass_fields__
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise TypeError(f"LLM() got an unexpected keyword argument {unknown[0]!r}")
    args = {k: v for k, v in kwargs.items() if v is not None and v != "auto"}
    args.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    args.setdefault("dtype", "bfloat16" if args["device"] == "cuda" else "float32")
    config = EngineConfig(model=model, **args)
    if config.kv_cache_memory_bytes is None and config.device == "cpu":
        config.kv_cache_memory_bytes = default_cpu_kv_cache_bytes(config)
    return config


def default_cpu_kv_cache_bytes(config: EngineConfig) -> int:
    """Room for max_num_seqs sequences at max_model_len, capped at 1 GiB but never below one full sequence."""
    from engine.loader import load_hf_config
    from engine.worker.model_runner import kv_cache_bytes_per_token

    per_token = kv_cache_bytes_per_token(load_hf_config(config), config)
    per_seq = per_token * -(-config.max_model_len // config.block_size) * config.block_size
    return max(per_seq, min(per_seq * config.max_num_seqs, _CPU_KV_CACHE_CAP))


def _progress_bar(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="Processed prompts", unit="req", dynamic_ncols=True)
