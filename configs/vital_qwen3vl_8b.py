"""The paper's recipe (§4.1, Table 12): Qwen3-VL-8B-Instruct + LoRA r64/a128, Qwen3-1.7B decoder, MedSigLIP
targets, AdamW 2e-5 with 5% warmup, bf16, lambda_text 1.0, lambda_visual 0.1, curriculum K=1 x5, K<=2 x5, all x10.

Point the paths at local checkpoints (HF directories or conversion.hf_to_flax outputs) and the built dataset:
    python -m vital_jax.train --config=configs/vital_qwen3vl_8b.py --workdir=/ckpt/vital_8b \
        --config.model.backbone_dir=/models/Qwen3-VL-8B-Instruct --config.model.decoder_dir=/models/Qwen3-1.7B \
        --config.data.data_dir=/data/vital_61k
"""

from configs import base


def get_config():
    c = base.get_config()
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.remat = True
    c.model.scan_layers = True  # with unrolled layers XLA keeps every layer's recomputation live (issue #6)
    c.vital.remat_latent_steps = True
    # Per process (every process of a multi-process run loads this many; the global batch is 48 x processes,
    # split over the mesh's data x fsdp axes). The paper gives no batch size; 48 per process is ours. With one
    # process per GPU (launch/slurm_gpu.sbatch's default) that is 48 per GPU, more than an 80 GB card holds at
    # 8B (launch/README.md): lower it there, or run one process per host.
    c.data.batch_size = 48
    c.mesh.shape = (-1, 1, 1)
    return c
