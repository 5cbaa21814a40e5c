"""Turns one logits row per sequence into the next token, following each sequence's SamplingParams (vLLM semantics).

Order: structured-output token masks (so logprobs show the constraint, as in vLLM); logprobs from those logits (as
vLLM's default `raw_logprobs`); then min_tokens masking of EOS and stop token ids, logit_bias, penalties, greedy
argmax or temperature / top-k / top-p / min-p and a draw. A draw is an argmax of probs / Exp(1) noise (the
Gumbel-max trick): a seeded request takes its noise from its own generator, so its tokens do not depend on what else
is in the batch. Work is batched across rows; per-row Python runs only for the rows that use a logit bias, penalties
or a seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vdeploy_engine.core.sequence import Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: None, or [(token id, logprob, rank)] with the sampled token first, then the top `logprobs` tokens.
    logprobs: list[list[tuple[int, float, int]] | None]


class Sampler:
    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.generator = torch.Generator(device).manual_seed(seed)

    def __call__(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        stop_ids: list[set[int]],
        apply_token_masks: Callable[[torch.Tensor], None] | None = None,
    ) -> SamplerOutput:
        """logits [N, V] for seqs[i]; stop_ids[i] are token ids seqs[i] may not sample yet (min_tokens);
        apply_token_masks sets the logits of tokens a grammar forbids to -inf, in place (float32 logits)."""
        params = [seq.request.params for seq in seqs]
        logits = logits.float()
        if apply_token_masks is not None:
            apply_token_masks(logits)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in params) else None
        logits = self._mask_early_stops(logits, stop_ids)
        for i, p in enumerate(params):
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), device=logits.device)
                logits[i, ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device)
        for i, seq in enumerate(seqs):
            if params[i].has_penalties:
                logits[i] = _apply_penalties(logits[i], seq)

        greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        tokens = logits.argmax(dim=-1)
        if not greedy.all():
            temperature = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=logits.device)
            probs = _filter(logits / temperature[:, None], params).softmax(dim=-1)
            noise = torch.empty_like(probs).exponential_(generator=self.generator)
            for i, seq in enumerate(seqs):
                if params[i].seed is not None and not params[i].greedy:
                    if seq.generator is None:
                        seq.generator = torch.Generator(logits.device).manual_seed(params[i].seed + seq.index)
                    noise[i].exponential_(generator=seq.generator)
            tokens = torch.where(greedy, tokens, (probs / noise).argmax(dim=-1))

        token_ids = tokens.tolist()
        logprobs: list[list[tuple[int, float, int]] | None] = [None] * len(seqs)
        if raw_logprobs is not None:
            for i, p in enumerate(params):
                if p.logprobs is not None:
                    logprobs[i] = _logprob_entries(raw_logprobs[i], token_ids[i], p.logprobs)
        return SamplerOutput(token_ids, logprobs)

    @staticmethod
    def _mask_early_stops(logits: torch.Tensor, stop_ids: list[set[int]]) -> torch.Tensor:
        for i, ids in enumerate(stop_ids):
            if ids:
                logits[i, list(ids)] = float("-inf")
        return logits


def _apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """OpenAI's presence/frequency penalties over generated tokens; the CTRL repetition penalty over prompt and
    generated tokens (as vLLM)."""
    p = seq.request.params
    output = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
    counts = torch.bincount(output, minlength=logits.numel())[: logits.numel()].to(logits.dtype)
    if p.repetition_penalty != 1.0:
        seen = counts > 0
        seen[torch.tensor(seq.request.prompt_token_ids, dtype=torch.long, device=logits.device)] = True
        penalised = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    return logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(logits.dtype)


def _filter(logits: torch.Tensor, params: list) -> torch.Tensor:
    """Masks tokens outside each row's top-k, top-p nucleus and min-p floor with -inf."""
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    vocab = logits.shape[-1]
    if any(top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        k = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=logits.device)
        ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
        drop = ranks >= k[:, None]
        sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop |= mass_before > torch.tensor(top_p, device=logits.device)[:, None]  # the top token always stays
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    if any(min_p):
        probs = logits.softmax(dim=-1)
        floor = torch.tensor(min_p, device=logits.device)[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def _logprob_entries(logprobs: torch.Tensor, token: int, top: int) -> list[tuple[int, float, int]]:
    sampled = logprobs[token]
    rank = int((logprobs > sampled).sum()) + 1
    entries = [(token, float(sampled), rank)]
    if top:
        values, ids = logprobs.topk(top)
        entries += [
            (t, v, r) for r, (t, v) in enumerate(zip(ids.tolist(), values.tolist(), strict=True), 1) if t != token
        ]
    return entries
