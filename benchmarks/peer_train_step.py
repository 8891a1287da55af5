"""The VITAL train step against its PyTorch peer (transformers + peft), same process, same random checkpoint, at
issue #16's sizes (goal: >= 1.5x samples/s on a 2-core CPU).

    python -m benchmarks.peer_train_step [--steps 5 --warmup 8 --torch_threads N \
        --attention_impl xla|dot_product --quick]

Both sides: a random Qwen3-VL built with transformers (text 512 x 8 layers, vision 256 x 4 blocks, vocabulary
32,000) with LoRA r64 (alpha 128, dropout 0.05) on all 7 projections of every text layer, a Qwen3 auxiliary
decoder (256 x 4 layers), pj_in and the visual projector; batch 2, one 448 x 448 image each (196 image tokens),
K = 4 latent steps, 16 answer tokens, 16-token step chains; the three losses (Eq. 7), AdamW with global-norm
clipping; float32. vital_jax runs its jitted `train_step`; PyTorch runs the loop of `benchmarks.train_step`
(prefill with a DynamicCache, K latent steps fed back as inputs_embeds, the answer over the cache, backward through
it all) with the adapters from `peft.get_peft_model` (pip install peft). The last line is the ratio.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.train_step import QUICK, Sizes, compare

PEER = Sizes(batch=2, latent_steps=4, grid=(1, 28, 28), answer=16, step_chain=16, roi_dim=32, lora_rank=64,
             text_hidden=512, text_layers=8, text_heads=8, text_kv_heads=4, text_head_dim=64,
             mrope_section=(12, 10, 10), vocab=32000, vision_hidden=256, vision_depth=4, vision_heads=8,
             decoder_hidden=256, decoder_layers=4, decoder_heads=4, decoder_head_dim=64)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=8, help="untimed steps of each side after the first call "
                   "(both speed up over their first ~8 steps here)")
    p.add_argument("--torch_threads", type=int, default=0, help="0 = torch's default")
    p.add_argument("--attention_impl", default="xla", help="vital_jax's attention (xla | dot_product)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 1 timed step, for the CI smoke test")
    args = p.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    sizes, steps, warmup = (QUICK, 1, 0) if args.quick else (PEER, args.steps, args.warmup)
    compare(sizes, steps, lora="peft", warmup=warmup, attention_impl=args.attention_impl)


if __name__ == "__main__":
    main()
