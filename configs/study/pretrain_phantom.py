"""Pretrain a small Qwen3-VL backbone and Qwen3 auxiliary decoder from random initialisation on phantom data.

    python -m vital_jax.pretrain --config=configs/study/pretrain_phantom.py --workdir=/tmp/pretrain
    python -m vital_jax.pretrain --config=configs/study/pretrain_phantom.py:quick --workdir=/tmp/pretrain_quick

Writes workdir/backbone_hf/ and workdir/decoder_hf/ (HF checkpoint directories: point `model.backbone_dir` /
`model.decoder_dir` of a training config at them) and workdir/pretrain_summary.json. Sizes are chosen for two
CPU cores: the backbone stage takes about two minutes, the decoder stage well under one. "quick" (for tests) is
a much smaller model trained for a few steps.
"""

from vital_jax import pretrain


def get_config(variant: str = ""):
    return pretrain.default_config(variant)
