"""Builders of tiny random transformers models saved to disk, the reference for parity tests."""

from __future__ import annotations

import os

import torch

from conversion.torch_decoding import cache_keyword


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
    return _build_and_save(Qwen3ForCausalLM, config, path)


def save_tiny_qwen3_vl(path: str, seed: int = 0, text: dict | None = None, vision: dict | None = None, **top):
    """A tiny random `Qwen3VLForConditionalGeneration` (eager, eval) saved with save_pretrained; returns it.

    Token ids: image 190, video 191, vision_start 188, vision_end 189 in a 200-token vocabulary.
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text_cfg = dict(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                    max_position_embeddings=4096,
                    rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2],
                                     "mrope_interleaved": True})
    text_cfg.update(text or {})
    vision_cfg = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=16,
                      temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=text_cfg["hidden_size"],
                      num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
    vision_cfg.update(vision or {})
    kwargs = dict(image_token_id=190, video_token_id=191, vision_start_token_id=188, vision_end_token_id=189,
                  tie_word_embeddings=False)
    kwargs.update(top)
    torch.manual_seed(seed)
    config = Qwen3VLConfig(text_config=text_cfg, vision_config=vision_cfg, **kwargs)
    return _build_and_save(Qwen3VLForConditionalGeneration, config, path)


def _build_and_save(model_cls, config, path: str):
    """Eager attention, eval mode, non-trivial norm weights (so a mapping that drops them cannot pass), saved."""
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    return model


def prefill_then_vector_steps(model, params, hf_model, ids, vectors, cache_len: int):
    """Prefill `ids` (B, T) into a fresh cache, then feed `vectors` (B, S, D) one step at a time as input
    embeddings (as the latent loop does), in our Qwen3 model and in transformers (inputs_embeds +
    past_key_values, positions T + s).

    Returns (our prefill output, our step logits (B, S, V), our final cache, HF prefill logits, HF step logits),
    the last two as torch tensors.
    """
    import jax.numpy as jnp

    from vital_jax.models.qwen3 import init_cache

    batch, prompt_len = ids.shape
    prefill = model.apply({"params": params}, input_ids=jnp.asarray(ids),
                          kv_cache=init_cache(model.config, batch, cache_len))
    cache, ours = prefill.kv_cache, []
    for t in range(vectors.shape[1]):
        step = model.apply({"params": params}, inputs_embeds=jnp.asarray(vectors[:, t:t + 1]), kv_cache=cache)
        cache = step.kv_cache
        ours.append(step.logits)
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids), use_cache=True)
        keyword = cache_keyword(hf_model)
        hf_prefill, past, theirs = ref.logits, getattr(ref, keyword), []
        for t in range(vectors.shape[1]):
            ref = hf_model(inputs_embeds=torch.tensor(vectors[:, t:t + 1]), use_cache=True,
                           position_ids=torch.full((batch, 1), prompt_len + t), **{keyword: past})
            past = getattr(ref, keyword)
            theirs.append(ref.logits)
    return prefill, jnp.concatenate(ours, 1), cache, hf_prefill, torch.cat(theirs, 1)
