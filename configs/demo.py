"""The one-command demo: synthetic phantoms, tiny random Qwen3-VL + Qwen3, the 3-phase curriculum on CPU.

    python -m vital_jax.train --config=configs/demo.py --workdir=/tmp/vital_demo

With real checkpoints and data, copy this file, set demo.enabled = False and the model/data paths.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.demo.enabled = True
    c.model.dtype = "float32"
    c.data.batch_size = 4
    c.data.prompt_buckets = (160,)
    c.data.max_answer_tokens = 48
    c.data.max_step_tokens = 48
    c.data.min_pixels = 128 * 128
    c.data.max_pixels = 128 * 128
    c.vital.lora_rank = 8
    c.vital.lora_alpha = 16.0
    c.optimizer.lr = 2e-3
    c.curriculum.max_k = (1, 2, 4)
    c.curriculum.epochs = (1, 1, 2)
    c.checkpoint.save_every_steps = 20
    c.logging.every_steps = 10
    return c
