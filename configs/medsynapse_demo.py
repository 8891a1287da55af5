"""MedSynapse-V on the built-in phantom demo: the demo's small pretrained Qwen3-VL as the backbone and its small
SigLIP tower as E_ana.

    python -m vital_jax.train --config=configs/medsynapse_demo.py --workdir=/tmp/medsynapse_demo
"""

from configs import base, demo


def get_config():
    c = demo.get_config()
    c.method = "medsynapse"
    c.medsynapse = base.medsynapse_section()
    c.medsynapse.sampler.num_heads = 4   # the demo SigLIP's 32 channels: 8 per head
    c.medsynapse.warmup.lr = 1e-3        # a 16-query sampler on a 7 x 7 grid, a few hundred steps
    c.medsynapse.warmup.epochs = 3
    return c
