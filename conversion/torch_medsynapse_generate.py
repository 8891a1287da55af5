"""MedSynapse-V inference in PyTorch on an exported model (`conversion/medsynapse_export.py`): no encoder, no P_phi;
A_psi makes the memory from Qwen3-VL's own visual tokens, then greedy decoding. For users who serve with
transformers, and the reference the JAX generation is tested against token for token.

    from transformers import Qwen3VLForConditionalGeneration
    from conversion.torch_medsynapse_generate import load_autonomous, medsynapse_generate
    model = Qwen3VLForConditionalGeneration.from_pretrained(export_dir).eval()
    autonomous = load_autonomous(export_dir)
    tokens = medsynapse_generate(model, autonomous, input_ids, pixel_values, image_grid_thw, eos_token_ids=[...])

Inputs are what the Qwen3-VL processor produces for ONE prompt (batch 1): input_ids (1, T) ending with
`<|im_start|>assistant\\n`, pixel_values (N, 1536), image_grid_thw (n_images, 3). Steps (§2.4, Eq. 6 and §2.2's
injection): the vision tower's merged tokens of all the prompt's images -> A_psi -> M_auto (N, D); the prompt's
first T - S tokens are run with its images (S = the export's prompt_tail: 0, or the assistant header's length when
the run put its memory inside the user turn); M_auto and the embeddings of the prompt's last S tokens are fed as one
block of `inputs_embeds` at positions `T - S + i + rope_delta` (i < N + S) on all three MRoPE axes (explicitly:
transformers would otherwise lose the delta); the first answer token comes from the block's last state. The
vision tower runs twice here (once for A_psi, once inside the prompt's forward), which costs time, not
correctness. torch is imported here only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from conversion.torch_decoding import cache_keyword, greedy_continue


def load_autonomous(export_dir: str):
    """A_psi as a torch module (float32) from `autonomous.safetensors` + `medsynapse.json`."""
    import torch
    from safetensors.torch import load_file

    # The JAX loader's reading and checks, so a damaged export fails here naming its file, not in forward().
    from conversion.medsynapse_export import read_autonomous_config, read_autonomous_tensors, read_prompt_tail

    config = read_autonomous_config(export_dir)
    weights = read_autonomous_tensors(export_dir, config, load_file)
    prompt_tail = read_prompt_tail(export_dir)

    class AutonomousMemory(torch.nn.Module):
        """Visual tokens (L, D) -> memory (N, D): LayerNorm, N-query attention pooling, fc1 -> exact GELU -> fc2,
        plus each slot's offset. `prompt_tail`: the prompt tokens that follow the memory (`medsynapse_generate`)."""

        def __init__(self):
            super().__init__()
            self.eps = config.layer_norm_eps
            self.prompt_tail = prompt_tail
            for name, tensor in weights.items():
                self.register_buffer(name.removeprefix("autonomous.").replace(".", "_"), tensor.float())

        def forward(self, tokens):
            h = torch.nn.functional.layer_norm(tokens.float(), (tokens.shape[-1],), self.norm_scale,
                                               self.norm_bias, self.eps)
            weights = torch.softmax(h @ self.queries.T / math.sqrt(h.shape[-1]), dim=0)  # (L, N)
            pooled = weights.T @ h
            x = torch.nn.functional.gelu(pooled @ self.fc1_kernel + self.fc1_bias)
            return x @ self.fc2_kernel + self.fc2_bias + self.slot_bias

    return AutonomousMemory().eval()


def medsynapse_generate(model, autonomous, input_ids, pixel_values, image_grid_thw, max_new_tokens: int = 32,
                        eos_token_ids: Sequence[int] = ()) -> list[int]:
    """Greedy answer token ids (including the EOS that stopped it, if any)."""
    import torch

    if input_ids.shape[0] != 1:
        raise ValueError("medsynapse_generate takes one prompt (batch 1); loop over examples for more")
    with torch.no_grad():
        visual = torch.cat(model.model.get_image_features(pixel_values, image_grid_thw).pooler_output, dim=0)
        memory = autonomous(visual)[None].to(model.dtype)  # (1, N, D)
        tail = autonomous.prompt_tail
        head, tail_ids = input_ids[:, :input_ids.shape[1] - tail], input_ids[:, input_ids.shape[1] - tail:]
        model.model.rope_deltas = None
        out = model(input_ids=head, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                    mm_token_type_ids=(head == model.config.image_token_id).long(), use_cache=True)
        delta = int(model.model.rope_deltas.reshape(-1)[0])
        block = torch.cat([memory, model.get_input_embeddings()(tail_ids)], dim=1)
        position, n = head.shape[1], block.shape[1]
        pos = (torch.arange(position, position + n) + delta).view(1, 1, n).expand(3, 1, n)
        keyword = cache_keyword(model)
        out = model(inputs_embeds=block, position_ids=pos, use_cache=True, **{keyword: getattr(out, keyword)})
        return greedy_continue(model, getattr(out, keyword), out.logits[:, -1], position + n, delta, max_new_tokens,
                               eos_token_ids)


if __name__ == "__main__":
    # A library module (no command line): running it did nothing and exited 0.
    raise SystemExit("error: conversion.torch_medsynapse_generate is a library module: load_autonomous(export_dir) "
                     "and medsynapse_generate(...) (see its docstring); evaluate a MedSynapse-V run with "
                     "python -m vital_jax.evaluate --memory=autonomous")
