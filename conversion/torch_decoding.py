"""Greedy decoding over a transformers Qwen3-VL cache, shared by the PyTorch reference generators
(`torch_latent_generate`, `torch_medsynapse_generate`). torch is never imported here: the caller's tensors are used.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence


def cache_keyword(model) -> str:
    """The name transformers gives the KV cache, as the forward's keyword and as the output's field: `cache` from
    the 5.2x releases on, `past_key_values` before (the old name still works there but warns and goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def greedy_continue(model, past, logits, position: int, rope_delta: int, max_new_tokens: int,
                    eos_token_ids: Sequence[int]) -> list[int]:
    """Greedy token ids from `logits` (1, V) on: each chosen token is fed at position `position + rope_delta` on all
    three MRoPE axes (explicitly: transformers would otherwise lose the delta), `position` counting up from the
    first new token. Stops after an EOS (kept) or `max_new_tokens`. Call under `torch.no_grad()`."""
    import torch

    keyword = cache_keyword(model)
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        token = int(torch.argmax(logits, dim=-1)[0])
        tokens.append(token)
        if token in eos_token_ids:
            break
        pos = torch.full((3, 1, 1), position + rope_delta, dtype=torch.long)
        out = model(input_ids=torch.tensor([[token]]), position_ids=pos, use_cache=True, **{keyword: past})
        past, logits = getattr(out, keyword), out.logits[:, -1]
        position += 1
    return tokens


if __name__ == "__main__":
    # A library module: running it did nothing and exited 0. The command that generates with an export is
    # torch_latent_generate.
    raise SystemExit("error: conversion.torch_decoding is a library module; generate with an exported VITAL model "
                     "with python -m conversion.torch_latent_generate --model=DIR --image=IMAGE --question=TEXT")
