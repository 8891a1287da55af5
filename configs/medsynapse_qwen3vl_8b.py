"""MedSynapse-V's recipe (arXiv 2604.26283, §3 implementation details): Qwen3-VL-8B-Instruct, a frozen anatomical
encoder, P_phi with N = 16 meta-queries and 2 layers.

  Stage I    P_phi, lr 2e-4, 3 epochs.
  Stage II   GRPO on LoRA rank 64 (alpha 128) on q/k/v/o: G = 4, clip 0.2, R = 1.0 r_acc + 0.5 r_causal, 200 steps
             of 32 prompts (the paper's rollout batch), completions up to 1,024 tokens, lr 1e-5 (constant; the authors'
             skeleton's: the paper gives no Stage II lr or schedule), no KL term.
  Stage III  A_psi, JSD beta 0.5, lr 1e-4, 3 epochs, one on-policy rollout of up to 1,024 tokens per example.

The paper's E_ana is MedSAM3; vital_jax offers SAM-1 ViT (MedSAM v1's architecture) and (Med)SigLIP (README,
"MedSynapse-V"). Point the paths at local checkpoints and the built dataset:
    python -m vital_jax.train --config=configs/medsynapse_qwen3vl_8b.py --workdir=/ckpt/medsynapse_8b \\
        --config.model.backbone_dir=/models/Qwen3-VL-8B-Instruct --config.model.roi_encoder_dir=/models/medsam_vit_b \\
        --config.data.data_dir=/data/vital_61k
"""

from configs import base, vital_qwen3vl_8b


def get_config():
    c = vital_qwen3vl_8b.get_config()
    c.method = "medsynapse"
    c.medsynapse = base.medsynapse_section()  # the paper's values are the section's defaults
    c.medsynapse.encoder.kind = "sam"
    c.medsynapse.encoder.store_dtype = "float16"  # 64 x 64 x 256 per image: 2 MiB instead of 4
    c.data.batch_size = 32
    c.medsynapse.ccr.rollout_prompts = 32
    # Stages II and III decode 1,024-token rollouts relaid out even under FSDP (the library's default keeps the
    # layout held when the mesh splits the weights): as held every decode step all-gathers every text layer again,
    # 26 GiB per device per token by benchmarks.medsynapse_8b's count (CPU, 8 x FSDP; float32 there, about half in
    # bf16 on a GPU), relaid out ~33 KB (token ids and stop flags) after one gather per call. The price is the
    # gathered text decoder held during the loop: peak 11.6 -> 38.7 GiB per device in Stage II and 11.2 -> 48.9 GiB
    # in Stage III by XLA:CPU's buffer assignment, an upper bound for an 80 GB GPU (XLA:CPU keeps float32 copies of
    # bf16 weights). Set False on smaller cards.
    c.medsynapse.rollout_relayout = True
    return c
