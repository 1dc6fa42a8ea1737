"""Builds random-weight transformers Qwen3.5 / Qwen3.5-MoE / Qwen3-Next models (text only or with
the vision tower), the parity oracle, saved with save_pretrained."""

from __future__ import annotations

import numpy as np
import torch
from transformers import (
    Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration, Qwen3_5MoeConfig,
    Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration, Qwen3_5MoeTextConfig,
    Qwen3_5TextConfig, Qwen3NextConfig, Qwen3NextForCausalLM)

HF_CLASSES = {Qwen3_5TextConfig: Qwen3_5ForCausalLM, Qwen3_5MoeTextConfig: Qwen3_5MoeForCausalLM,
              Qwen3NextConfig: Qwen3NextForCausalLM,
              Qwen3_5Config: Qwen3_5ForConditionalGeneration,
              Qwen3_5MoeConfig: Qwen3_5MoeForConditionalGeneration}
# The tiny vision-language models' special tokens (inside the tiny vocabularies).
VISION_TOKEN_IDS = dict(image_token_id=201, video_token_id=202, vision_start_token_id=203,
                        vision_end_token_id=204)


def _text_kwargs(*, layers=6, hidden=64, heads=4, kv_heads=2, head_dim=32, key_heads=2,
                 value_heads=2, key_dim=16, value_dim=24, vocab=211, tied=True,
                 mrope_section=(2, 1, 1), partial_rotary_factor=0.25, layer_types=None) -> dict:
    rope = {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": partial_rotary_factor}
    if mrope_section is not None:
        rope.update(mrope_section=list(mrope_section), mrope_interleaved=True)
    return dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        linear_num_key_heads=key_heads, linear_num_value_heads=value_heads,
        linear_key_head_dim=key_dim, linear_value_head_dim=value_dim, tie_word_embeddings=tied,
        layer_types=layer_types, rope_parameters=rope)


def hf_text_config(*, mlp=96, **kwargs) -> Qwen3_5TextConfig:
    """A tiny transformers Qwen3_5TextConfig; arguments name the dimensions the tests vary."""
    return Qwen3_5TextConfig(intermediate_size=mlp, **_text_kwargs(**kwargs))


def hf_moe_config(*, next_arch=False, experts=8, top_k=2, expert_mlp=24, shared_mlp=40,
                  norm_topk_prob=True, **kwargs):
    """A tiny Qwen3_5MoeTextConfig (or, with next_arch, Qwen3NextConfig with 1-D RoPE)."""
    moe = dict(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=expert_mlp,
               shared_expert_intermediate_size=shared_mlp)
    if next_arch:
        return Qwen3NextConfig(**moe, norm_topk_prob=norm_topk_prob, intermediate_size=56,
                               **_text_kwargs(mrope_section=None, **kwargs))
    return Qwen3_5MoeTextConfig(**moe, **_text_kwargs(**kwargs))


def hf_vlm_config(*, moe=False, depth=2, vision_hidden=64, vision_heads=4, vision_mlp=128,
                  position_side=16, **text_kwargs):
    """A tiny Qwen3_5Config (or Qwen3_5MoeConfig): a text config as above plus a small vision tower
    whose output width is the text hidden size."""
    text = hf_moe_config(**text_kwargs) if moe else hf_text_config(**text_kwargs)
    vision = dict(depth=depth, hidden_size=vision_hidden, num_heads=vision_heads,
                  intermediate_size=vision_mlp, out_hidden_size=text.hidden_size,
                  num_position_embeddings=position_side**2)
    composite = Qwen3_5MoeConfig if moe else Qwen3_5Config
    return composite(text_config=text.to_dict(), vision_config=vision, **VISION_TOKEN_IDS,
                     tie_word_embeddings=text.tie_word_embeddings)


def build_hf_model(config, seed=0):
    """A float32 HF model with EVERY parameter perturbed (HF's init leaves norms and dt_bias constant),
    on its pure PyTorch paths (eager attention, the eager experts loop)."""
    torch.manual_seed(seed)
    for part in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        if part is not None:
            part._attn_implementation = "eager"
            part._experts_implementation = "eager"
    model = HF_CLASSES[type(config)](config).float().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def hf_logits(model, input_ids: np.ndarray) -> np.ndarray:
    """[B, T] ids -> [B, T, V] float32 logits from transformers' pure PyTorch path."""
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(input_ids), dtype=torch.long)).logits.float().numpy()


def hf_logits_and_aux(model, input_ids: np.ndarray) -> tuple[np.ndarray, float]:
    """MoE models: logits and HF's load-balancing aux loss (output_router_logits=True)."""
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(input_ids), dtype=torch.long), output_router_logits=True)
    return out.logits.float().numpy(), float(out.aux_loss)


def relative_error(ours, reference) -> float:
    """max |ours - reference| / max |reference|."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))
