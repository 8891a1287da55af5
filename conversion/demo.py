"""End-to-end conversion demo on a tiny random Qwen3 (no downloads; needs torch for the reference model).

    python -m conversion.demo [--workdir=/tmp/vital_conversion_demo]

Builds a random Qwen3ForCausalLM with transformers, saves it, converts it to a vital_jax directory, generates
greedily with vital_jax and with transformers, exports back to HF and reloads it, and prints what it checked.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax.numpy as jnp
import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m conversion.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "vital_conversion_demo"),
                        help="where the demo writes its hf/, flax/ and export/ folders (replaced on a rerun)")
    args = parser.parse_args()

    import torch
    from transformers import Qwen3Config as HFConfig
    from transformers import Qwen3ForCausalLM as HFQwen3

    from conversion import flax_to_hf, hf_to_flax
    from vital_jax.generation import SamplingConfig
    from vital_jax.models import model_dir
    from vital_jax.models.qwen3 import Qwen3Config
    from vital_jax.models.qwen3.generate import generate
    from vital_jax.models.qwen3.params import abstract_params

    hf_dir, flax_dir, export_dir = (os.path.join(args.workdir, d) for d in ("hf", "flax", "export"))
    import shutil
    for stale in (hf_dir, flax_dir, export_dir):  # a rerun's: the demo's own folders only, not the whole workdir
        if os.path.isdir(stale):
            shutil.rmtree(stale)
    torch.manual_seed(0)
    hf_config = HFConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)
    hf_model = HFQwen3(hf_config).eval()
    hf_model.save_pretrained(hf_dir)
    print(f"1. tiny random Qwen3 saved with transformers: {hf_dir}")

    summary = hf_to_flax.convert(hf_dir, flax_dir)
    print(f"2. converted to Flax ({summary['parameters']:,} parameters): {flax_dir}")

    config = Qwen3Config.from_pretrained(flax_dir)
    params = model_dir.load_params(flax_dir, abstract_params(config))
    prompt = np.random.RandomState(0).randint(0, 512, (2, 8)).astype(np.int32)
    tokens, _ = generate(params, jnp.asarray(prompt), jnp.ones(prompt.shape, bool), config,
                         SamplingConfig(max_new_tokens=16))
    with torch.no_grad():
        reference = hf_model.generate(torch.tensor(prompt, dtype=torch.long), do_sample=False,
                                      max_new_tokens=16, min_new_tokens=16,
                                      attention_mask=torch.ones(prompt.shape, dtype=torch.long))[:, 8:].numpy()
    same = bool(np.array_equal(np.asarray(tokens), reference))
    print(f"3. greedy generation, 16 tokens x 2 prompts: vital_jax == transformers: {same}")

    files = flax_to_hf.export(flax_dir, export_dir)
    reloaded = HFQwen3.from_pretrained(export_dir).eval()
    with torch.no_grad():
        diff = float((reloaded(torch.tensor(prompt, dtype=torch.long)).logits
                      - hf_model(torch.tensor(prompt, dtype=torch.long)).logits).abs().max())
    print(f"4. exported back to HF ({', '.join(files)}) and reloaded: max |logit diff| = {diff:.2e}: {export_dir}")
    ok = same and diff == 0.0
    print("conversion demo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
