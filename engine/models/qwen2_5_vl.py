"""Qwen2.5-VL's language model on text, the backbone of jina-embeddings-v4 (its vLLM variants are Qwen2.5-VL checkpoints
with the adapter merged). The vision tower's weights are skipped: image inputs are not supported.

Qwen2.5-VL rotates q and k with multimodal rotary: the head's frequencies are cut into temporal, height and width
sections, each turned by its own position id. A text token has the same index in all three, so every section turns
by the token's position and the rotation is plain rotary over text positions: the Qwen2 layers run unchanged.
"""

from __future__ import annotations

from typing import Any

from vdeploy_engine.distributed.parallel import SINGLE, TPGroup
from vdeploy_engine.models.llama import Qwen2ForCausalLM


class Qwen2_5_VLForConditionalGeneration(Qwen2ForCausalLM):  # noqa: N801 (the HF architecture name)
    # Jina v4 embeds a text as the mean of its last hidden states, normalised (its vLLM variants' pooling).
    default_pooling = "mean"

    def __init__(self, hf_config: Any, tp: TPGroup = SINGLE):
        text_config = hf_config.get_text_config()
        text_config.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        super().__init__(text_config, tp)
        self.config = hf_config

    def map_checkpoint_name(self, name: str) -> tuple[str, str | None] | None:
        """The text model's tensors in either layout (`model.layers...`, or transformers 5's
        `model.language_model.layers...`); the vision tower's are skipped."""
        if name.startswith(("visual.", "model.visual.")):
            return None
        return super().map_checkpoint_name(name.replace("model.language_model.", "model.", 1))
