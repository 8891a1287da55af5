"""VITAL inference in PyTorch on an exported HF model (python -m conversion.flax_to_hf --checkpoint=WORKDIR):
prefix -> K latent steps -> greedy decoding, for users who serve with transformers.

    python -m conversion.torch_latent_generate --model=EXPORT_DIR --image=scan.png --question="Where is the liver?"

The command prepares the prompt as training did (vital_jax's image preprocessing, the export's
preprocessor_config.json and the pixel budget recorded in vital.json, and its chat template), so it needs
torch and transformers but not torchvision. From Python:

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

import os
import sys
from collections.abc import Sequence

import numpy as np

from conversion.torch_decoding import cache_keyword, greedy_continue


def latent_generate(model, input_ids, pixel_values, image_grid_thw, latent_steps: int, max_new_tokens: int = 32,
                    eos_token_ids: Sequence[int] = (), pause_embeddings=None) -> list[int]:
    """Greedy answer token ids (including the EOS that stopped it, if any). pause_embeddings (K_max, D), for a run
    trained with `vital.latent_input = "pause"` (`read_pause_embeddings`): slot k is fed p_k instead of z_{k-1}."""
    import torch

    if pause_embeddings is not None and pause_embeddings.shape[0] < latent_steps:
        raise ValueError(f"pause_embeddings has {pause_embeddings.shape[0]} rows for {latent_steps} latent steps")

    if input_ids.shape[0] != 1:
        raise ValueError("latent_generate takes one prompt (batch 1); loop over examples for more")
    image_token_id = model.config.image_token_id
    keyword = cache_keyword(model)
    with torch.no_grad():
        model.model.rope_deltas = None
        out = model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                    mm_token_type_ids=(input_ids == image_token_id).long(), use_cache=True,
                    output_hidden_states=True)
        delta = int(model.model.rope_deltas.reshape(-1)[0])
        past = getattr(out, keyword)
        z = out.hidden_states[-1][:, -1:]  # post-norm: what the latent loop feeds back
        position = input_ids.shape[1]
        for k in range(latent_steps):
            pos = torch.full((3, 1, 1), position + delta, dtype=torch.long)
            fed = z if pause_embeddings is None else pause_embeddings[k].to(z.dtype).reshape(1, 1, -1)
            out = model(inputs_embeds=fed, position_ids=pos, use_cache=True, output_hidden_states=True,
                        **{keyword: past})
            past, z = getattr(out, keyword), out.hidden_states[-1][:, -1:]
            position += 1
        return greedy_continue(model, past, model.lm_head(z)[:, -1], position, delta, max_new_tokens, eos_token_ids)


def prepare_inputs(model_dir: str, image: str, question: str):
    """(input_ids (1, T), pixel_values (N, 1536), image_grid_thw (1, 3)) as torch tensors, and the tokenizer, for
    one image and question: the export's preprocessor settings, with the pixel budget the run was trained with
    (vital.json's min_pixels / max_pixels, when the export records them)."""
    import torch

    from vital_jax.data.images import load_image
    from vital_jax.models.qwen3_vl import preprocessing, prompt

    settings = preprocessing.read_preprocessor_config(model_dir)
    settings.update(_vital_json(model_dir).get("pixels", {}))
    patches, grid = preprocessing.preprocess_image(load_image(image), **settings)
    tokenizer = prompt.load_tokenizer(model_dir)
    ids = prompt.tokenize_prompt(tokenizer, question, grid, merge_size=settings["merge_size"]).input_ids
    return (torch.tensor(ids[None], dtype=torch.long), torch.tensor(patches), torch.tensor(grid[None]),
            tokenizer)


def read_pause_embeddings(model_dir: str):
    """The pause vectors (K_max, D) torch tensor of an export whose run fed its latent slots learned constants
    (vital.json "latent_input": "pause"); None for a feedback run (exports made before the field was recorded
    are feedback runs or lack the vectors: a pause run's export without them is refused, naming the file)."""
    import torch

    from conversion.vital_export import HEADS_FILE, PAUSE_TENSOR
    from vital_jax.models import safetensors_io

    if _vital_json(model_dir).get("latent_input", "feedback") != "pause":
        return None
    path = os.path.join(model_dir, HEADS_FILE)
    tensors = safetensors_io.read_file(path) if os.path.exists(path) else {}
    if PAUSE_TENSOR not in tensors:
        raise ValueError(f"{path}: no {PAUSE_TENSOR}, which this pause run's latent slots are fed (vital.json "
                         "latent_input); export the run again")
    return torch.tensor(np.asarray(tensors[PAUSE_TENSOR], np.float32))


def default_latent_steps(model_dir: str) -> int:
    """The K the run trained its records with at most: K_max, capped by `vital.latent_steps_cap` when set."""
    record = _vital_json(model_dir)
    k_max, cap = int(record["k_max"]), int(record.get("latent_steps_cap", -1))
    return min(k_max, cap) if cap >= 0 else k_max


def _vital_json(model_dir: str) -> dict:
    path = os.path.join(model_dir, "vital.json")
    if not os.path.exists(path):
        raise ValueError(f"{model_dir}: no vital.json; export a VITAL run with python -m conversion.flax_to_hf "
                         "--checkpoint=WORKDIR --out=DIR")
    from vital_jax.jsonio import read_json

    config = read_json(path, ValueError)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    return config


def main(argv=None) -> int:
    from vital_jax import cli

    parser = cli.ArgumentParser(prog="python -m conversion.torch_latent_generate",
                                description="Answer one image + question with an exported VITAL model in PyTorch "
                                            "(transformers), K latent steps then greedy decoding.")
    parser.add_argument("--model", required=True, help="an exported run (python -m conversion.flax_to_hf "
                                                       "--checkpoint=WORKDIR --out=DIR)")
    parser.add_argument("--image", required=True, help="image file (PNG, JPEG, 16-bit PNG, ...)")
    parser.add_argument("--question", required=True, help="the question")
    parser.add_argument("--latent_steps", type=int, default=None,
                        help="K (default: the run's K_max, or its vital.latent_steps_cap when it set one)")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="answer length limit (default 32)")
    args = parser.parse_args(argv)
    for flag, path in (("model", args.model), ("image", args.image)):
        if not os.path.exists(path):
            cli.usage(f"--{flag}={path}: no such file or directory")
    try:
        import torch  # noqa: F401
        from transformers import Qwen3VLForConditionalGeneration
    except ImportError as e:
        cli.fail(f"{e}; this command needs torch and transformers (pip install torch transformers)")
    from vital_jax.models.qwen3_vl import prompt

    try:
        k_max = int(_vital_json(args.model)["k_max"])
        k = default_latent_steps(args.model) if args.latent_steps is None else args.latent_steps
        if not 0 <= k <= k_max:
            cli.usage(f"--latent_steps={k} is outside 0..K_max={k_max} of this model")
        pause = read_pause_embeddings(args.model)
        input_ids, pixel_values, grid, tokenizer = prepare_inputs(args.model, args.image, args.question)
    except ValueError as e:  # a malformed export or image: PromptError, ImageError, ImagePreprocessError
        cli.fail(e)
    print(f"loading {args.model} with transformers...", file=sys.stderr, flush=True)
    model = Qwen3VLForConditionalGeneration.from_pretrained(args.model).eval()
    special = prompt.special_token_ids(tokenizer)
    eos = (special[prompt.IM_END], special[prompt.ENDOFTEXT])
    tokens = latent_generate(model, input_ids, pixel_values, grid, k, args.max_new_tokens, eos, pause)
    print(tokenizer.decode([t for t in tokens if t not in eos], skip_special_tokens=True).strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
