"""Pretrain a small Qwen3-VL backbone and Qwen3 auxiliary decoder from random initialisation on phantom data.

    python -m vital_jax.pretrain --config=configs/study/pretrain_phantom.py --workdir=/tmp/pretrain
    python -m vital_jax.pretrain --config=configs/study/pretrain_phantom.py:quick --workdir=/tmp/pretrain_quick

Writes workdir/backbone_hf/ and workdir/decoder_hf/ (HF checkpoint directories: point `model.backbone_dir` /
`model.decoder_dir` of a training config at them) and workdir/pretrain_summary.json. Sizes are chosen for two
CPU cores: the backbone stage takes about two minutes, the decoder stage well under one. "quick" (for tests) is
a much smaller model trained for a few steps.
"""

import ml_collections


def get_config(variant: str = ""):
    c = ml_collections.ConfigDict()
    c.seed = 0
    # A ready corpus (pairs.jsonl, texts.jsonl, tokenizer/); empty: build the phantom corpus into workdir/corpus.
    c.corpus_dir = ""
    c.corpus = ml_collections.ConfigDict(dict(seed=1000, num_phantoms=300, phantom_size=128,
                                              modalities=("CT", "MRI", "ultrasound")))
    c.stages = ("backbone", "decoder")
    c.train_split = "train"
    c.val_split = "val"
    # train_parts: which backbone parameters train, "all" | "vision" (params["visual"]) | "llm" (language model +
    # lm_head); the rest stay at their initial values.
    c.backbone = ml_collections.ConfigDict(dict(
        hidden=96, layers=3, head_dim=16, heads=6, kv_heads=2, intermediate=192,
        vision_depth=2, vision_hidden=64, vision_heads=4, vision_intermediate=128, deepstack=(0,),
        image_pixels=128 * 128, train_parts="all",
        steps=600, batch_size=16, lr=2e-3, prompt_buckets=(64, 128), text_buckets=(32, 64, 128)))
    c.decoder = ml_collections.ConfigDict(dict(
        hidden=64, layers=2, head_dim=16, heads=4, kv_heads=1, intermediate=128,
        steps=1000, batch_size=32, lr=2e-3, text_buckets=(32, 64, 128)))
    c.optimizer = ml_collections.ConfigDict(dict(warmup_ratio=0.05, weight_decay=0.01, b1=0.9, b2=0.999,
                                                 max_grad_norm=1.0))
    # Validation loss every `every_steps` steps and at the end, over the first `max_examples` of the val split.
    c.eval = ml_collections.ConfigDict(dict(every_steps=100, max_examples=64))
    c.checkpoint = ml_collections.ConfigDict(dict(save_every_steps=100, keep=2, async_save=True))
    c.logging = ml_collections.ConfigDict(dict(every_steps=10))
    if variant == "quick":
        c.corpus.num_phantoms = 12
        c.backbone.update(hidden=32, layers=2, heads=2, kv_heads=1, intermediate=64, vision_depth=1,
                          vision_hidden=32, vision_heads=2, vision_intermediate=64, steps=30, batch_size=4,
                          lr=5e-3)
        c.decoder.update(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, steps=60, batch_size=4, lr=5e-3)
        c.eval.update(every_steps=10, max_examples=8)
        c.checkpoint.update(save_every_steps=10, async_save=False)
        c.logging.every_steps = 5
    elif variant:
        raise ValueError(f"unknown variant {variant!r} (expected '' or 'quick')")
    return c
