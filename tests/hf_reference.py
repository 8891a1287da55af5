"""Builders of tiny random transformers models saved to disk, the reference for parity tests."""

from __future__ import annotations

import os

import torch


def save_tiny_qwen3(path: str, seed: int = 0, **overrides):
    """A tiny random `Qwen3ForCausalLM` (eager attention, eval mode) saved with save_pretrained; returns it."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
                  max_position_embeddings=512, rope_theta=1e6, tie_word_embeddings=True,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    config = Qwen3Config(**kwargs)
    config._attn_implementation = "eager"
    model = Qwen3ForCausalLM(config).eval()
    # Non-trivial norm weights, so a mapping that drops them cannot pass.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    return model
