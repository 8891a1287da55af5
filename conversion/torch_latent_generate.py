"""VITAL inference in PyTorch on an exported HF model (python -m conversion.flax_to_hf --checkpoint=WORKDIR):
prefix -> K latent steps -> greedy decoding, for users who serve with transformers.

    from transformers import Qwen3VLForConditionalGeneration
    from conversion.torch_latent_generate import latent_generate
    model = Qwen3VLForConditionalGeneration.from_pretrained(export_dir).eval()
    tokens = latent_generate(model, input_ids, pixel_values, image_grid_thw, latent_steps=4, eos_token_ids=[...])

Inputs are what the Qwen3-VL processor produces for ONE prompt (batch 1): input_ids (1, T) ending with
`<|im_start|>assistant\\n`, pixel_values (N, 1536), image_grid_thw (n_images, 3). The loop is Eq. (1)-(2) of the
paper: z_0 is the prompt's last post-norm hidden state; each step feeds z_{k-1} as `inputs_embeds` at position
`T + k - 1 + rope_delta` on all three MRoPE axes (passed explicitly: transformers would otherwise lose the
delta), and the first answer token comes from `lm_head(z_K)`. torch is imported here only.
"""

from __future__ import annotations

from collections.abc import Sequence


def latent_generate(model, input_ids, pixel_values, image_grid_thw, latent_steps: int, max_new_tokens: int = 32,
                    eos_token_ids: Sequence[int] = ()) -> list[int]:
    """Greedy answer token ids (including the EOS that stopped it, if any)."""
    import torch

    if input_ids.shape[0] != 1:
        raise ValueError("latent_generate takes one prompt (batch 1); loop over examples for more")
    image_token_id = model.config.image_token_id
    with torch.no_grad():
        model.model.rope_deltas = None
        out = model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                    mm_token_type_ids=(input_ids == image_token_id).long(), use_cache=True,
                    output_hidden_states=True)
        delta = int(model.model.rope_deltas.reshape(-1)[0])
        past = out.past_key_values
        z = out.hidden_states[-1][:, -1:]  # post-norm: what the latent loop feeds back
        position = input_ids.shape[1]
        for _ in range(latent_steps):
            pos = torch.full((3, 1, 1), position + delta, dtype=torch.long)
            out = model(inputs_embeds=z, past_key_values=past, position_ids=pos, use_cache=True,
                        output_hidden_states=True)
            past, z = out.past_key_values, out.hidden_states[-1][:, -1:]
            position += 1
        logits = model.lm_head(z)[:, -1]
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            token = int(torch.argmax(logits, dim=-1)[0])
            tokens.append(token)
            if token in eos_token_ids:
                break
            pos = torch.full((3, 1, 1), position + delta, dtype=torch.long)
            out = model(input_ids=torch.tensor([[token]]), past_key_values=past, position_ids=pos, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
            position += 1
    return tokens
