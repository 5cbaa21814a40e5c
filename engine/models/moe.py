"""Mixture-of-experts decoders: Qwen3-MoE (q/k norms, some layers may stay dense) and Mixtral (a Mistral whose every
MLP is eight experts). Attention, norms and embeddings are the llama family's; only the MLP changes.

A router (a linear layer to one logit per expert) picks each token's top-k experts; softmax over all experts in
float32, then the top k, renormalised to sum to one (Mixtral always, Qwen3-MoE when `norm_topk_prob`). The experts'
weights are stacked ([E, 2I, H] gate/up, [E, H, I] down) for ops.fused_moe. Under tensor parallelism every rank holds
every expert's slice of the intermediate dimension (gate/up rows, down columns) and the ranks' outputs are summed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vdeploy_engine.distributed.parallel import TPGroup
from vdeploy_engine.layers.linear import Linear, WeightShapeError
from vdeploy_engine.layers.norm import RMSNorm
from vdeploy_engine.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel
from vdeploy_engine.models.qwen3 import QKNormAttention
from vdeploy_kernels import ops

# Checkpoint names of one expert's projections -> our shard names (Qwen3-MoE, then Mixtral's w1/w3/w2).
_EXPERT_PROJECTIONS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}


class SparseMoE(nn.Module):
    def __init__(
        self, hidden: int, intermediate: int, num_experts: int, top_k: int, renormalize: bool, tp: TPGroup
    ):
        super().__init__()
        self.top_k, self.renormalize, self.tp = top_k, renormalize, tp
        self.intermediate = tp.split(intermediate, "the experts' intermediate size")
        self.gate = Linear(hidden, num_experts)  # the router, replicated
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.intermediate, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, self.intermediate), requires_grad=False)
        experts = range(num_experts)
        self.w13.shard_names = tuple(f"{e}.{part}" for e in experts for part in ("gate", "up"))
        self.w2.shard_names = tuple(f"{e}.down" for e in experts)
        self.w13.weight_loader = self.w2.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: str) -> None:
        """Places one expert's projection ([I, H] gate or up, [H, I] down): this rank's intermediate slice of it."""
        expert, part = shard.split(".")
        rank, size = self.tp.rank, self.intermediate
        if part == "down":
            target, loaded = param.data[int(expert)], loaded[:, rank * size : (rank + 1) * size]
        else:
            rows = param.data[int(expert)]
            target = rows[:size] if part == "gate" else rows[size:]
            loaded = loaded[rank * size : (rank + 1) * size]
        if target.shape != loaded.shape:
            raise WeightShapeError(f"expected shape {tuple(target.shape)} for this rank, got {tuple(loaded.shape)}")
        target.copy_(loaded)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] in x's dtype, expert ids [T, k])."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        return self.tp.all_reduce(ops.fused_moe(x, self.w13, self.w2, weights, ids))

    def forward_fused(self, hidden: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
        """hidden + moe(norm(hidden)), the residual stream form of a decode step (LlamaDecoderLayer.forward_fused)."""
        return hidden + self(norm(hidden))


def map_expert_name(name: str) -> tuple[str, str] | None:
    """`...mlp.experts.{e}.{projection}.weight` -> (`...mlp.w13` or `...mlp.w2`, shard), else None."""
    if ".experts." not in name:
        return None
    prefix, rest = name.split(".experts.", 1)
    expert, projection, _ = rest.split(".")
    part = _EXPERT_PROJECTIONS[projection]
    return f"{prefix}.{'w2' if part == 'down' else 'w13'}", f"{expert}.{part}"


class Qwen3MoeDecoderLayer(LlamaDecoderLayer):
    attention_cls = QKNormAttention

    def make_mlp(self, hf_config: Any, tp: TPGroup, index: int) -> nn.Module:
        sparse = (
            index not in (getattr(hf_config, "mlp_only_layers", None) or [])
            and hf_config.num_experts > 0
            and (index + 1) % hf_config.decoder_sparse_step == 0
        )
        if not sparse:
            return LlamaMLP(hf_config, tp)
        return SparseMoE(
            hf_config.hidden_size, hf_config.moe_intermediate_size, hf_config.num_experts,
            hf_config.num_experts_per_tok, hf_config.norm_topk_prob, tp,
        )


class MixtralDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, hf_config: Any, tp: TPGroup, index: int) -> nn.Module:
        return SparseMoE(
            hf_config.hidden_size, hf_config.intermediate_size, hf_config.num_local_experts,
            hf_config.num_experts_per_tok, True, tp,
        )


class Qwen3MoeModel(LlamaModel):
    layer_cls = Qwen3MoeDecoderLayer


class MixtralModel(LlamaModel):
    layer_cls = MixtralDecoderLayer


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    """Qwen3-MoE checkpoints (Qwen3-30B-A3B, Qwen3-235B-A22B)."""

    model_cls = Qwen3MoeModel

    def map_checkpoint_name(self, name: str) -> tuple[str, str | None] | None:
        return map_expert_name(name) or super().map_checkpoint_name(name)


class MixtralForCausalLM(LlamaForCausalLM):
    """Mixtral checkpoints (8x7B, 8x22B): the MoE block is stored as `block_sparse_moe`."""

    model_cls = MixtralModel

    def map_checkpoint_name(self, name: str) -> tuple[str, str | None] | None:
        name = name.replace(".block_sparse_moe.", ".mlp.")
        return map_expert_name(name) or super().map_checkpoint_name(name)
