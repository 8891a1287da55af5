"""Every field of a vital_jax training config, with the paper's defaults (Table 12). Recipes start from this.

Override any field on the command line: `--config.optimizer.lr=1e-5`. Unknown fields and wrong types are errors.
"""

import ml_collections
from ml_collections import config_dict


def get_config():
    c = ml_collections.ConfigDict()
    c.method = "vital"  # or "medsynapse" (add its section with `medsynapse_section`, as configs/medsynapse_*.py do)
    c.seed = 0
    # Built-in synthetic assets (vital_jax/demo.py): PhantomVQA with `split_counts` phantoms per split (train, val,
    # test) and a small VLM pretrained on phantom image-text data: "shipped" (vital_jax/assets/phantom_vlm) or a
    # variant of configs/study/pretrain_phantom.py ("demo", "quick") pretrained in the workdir.
    c.demo = ml_collections.ConfigDict(dict(
        enabled=False, seed=0, split_counts=(100, 10, 30), phantom_size=96, modalities=("CT", "MRI"),
        pretrain="shipped", finish=True))  # after training: evaluate K=0 / K_max, explain one example, export to HF
    c.model = ml_collections.ConfigDict(dict(
        backbone_dir="",        # HF Qwen3-VL directory or a converted (conversion.hf_to_flax) directory
        decoder_dir="",         # HF Qwen3 directory or a converted directory
        tokenizer_dir="",       # directory with tokenizer.json (defaults to backbone_dir)
        roi_encoder_dir="",     # MedSigLIP directory (used by the explain tool's heatmaps, not by training)
        dtype="bfloat16",       # activation dtype
        param_dtype="float32",  # storage dtype of the frozen base weights (trainables are always float32)
        remat=False,            # rematerialise decoder layers in the backward pass
        remat_policy="full",    # what remat keeps: "full" (only each layer's input), "dots" (also every weight
                                # matmul's output: no matmul recomputed, more memory) or "projections" (each
                                # projection's output once, base + adapter: about half of dots' extra memory, the
                                # rank-r adapter products recomputed); same numbers under each
        scan_layers=False,      # run decoder layers as one nn.scan (stacked params): one compiled layer, and
                                # remat then bounds memory to one layer; checkpoints keep the per-layer layout
        attention_impl="xla",   # attention (both towers): "xla" (reference einsums, f32 softmax), "dot_product"
                                # (jax.nn.dot_product_attention, XLA), "cudnn" (flash, NVIDIA GPUs, bf16) or
                                # "pallas_flash" (TPU); same weights
    ))
    c.data = ml_collections.ConfigDict(dict(
        data_dir="", train_split="train", eval_split="test", batch_size=8, prompt_buckets=(512, 1024, 2048),
        max_answer_tokens=64, max_step_tokens=96, min_pixels=65536, max_pixels=448 * 448, num_workers=0,
        blind_images=False))  # True: every image mid-gray (the text-only control)
    c.vital = ml_collections.ConfigDict(dict(
        k_max=4, lambda_text=1.0, lambda_visual=0.1, visual_loss_reduction="mean", task_loss_reduction="token",
        visual_target="shared",
        lora_rank=64, lora_alpha=128.0, lora_dropout=0.05, vp_dropout=0.1, remat_latent_steps=False,
        train_decoder=True, latent_steps_cap=-1,
        latent_input="feedback"))  # "pause": learned constant slot inputs instead of z (the pause control)
    # schedule_scope: "curriculum" = one warmup-cosine schedule over all phases, AdamW's moments carried from phase
    # to phase (one run); "phase" = each phase its own warmup-cosine over its steps and fresh moments at its start
    # (separate runs, each warm-started from the previous phase's weights: the paper's other reading, README).
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=2e-5, warmup_ratio=0.05, weight_decay=0.01, b1=0.9, b2=0.999, max_grad_norm=1.0,
        schedule_scope="curriculum"))
    # Phase n trains on records with min_k[n] <= latent_steps <= max_k[n] for epochs[n] epochs, warm-starting from
    # phase n-1 (min_k may be left empty: 1 for every phase). max_steps > 0 stops the whole curriculum after that
    # many optimizer steps (the learning-rate schedule spans them; later phases are skipped): equal-step
    # comparisons and smoke runs. compile_ahead: the later phases' train steps compile in a background thread while
    # the first phase compiles and trains (the phase boundaries then do not wait for XLA; same results).
    c.curriculum = ml_collections.ConfigDict(dict(max_k=(1, 2, 4), epochs=(5, 5, 10), min_k=(), max_steps=0,
                                                   compile_ahead=True))
    # atomicity: "rename" (each step written to a temporary directory, then renamed) or "commit_file" (written in
    # place, finished by a commit_success.txt): a workdir on a gcsfuse-mounted bucket, which renames no directory
    # of a flat bucket unless mounted with --rename-dir-limit (vital_jax/checkpoint.py).
    c.checkpoint = ml_collections.ConfigDict(dict(save_every_steps=500, keep=2, async_save=True, atomicity="rename"))
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))  # (data, fsdp, tensor); -1 = remaining devices
    # peak_tflops_per_device: bf16 peak for perf/mfu; 0 = from the device kind (H100, A100, TPU v4/v5/v6, ...).
    # probe_every_steps: every N steps, TensorBoard gets one fixed example's latent steps as visual-projector
    # heatmaps over its image and as decoded text (vital_jax/probe.py); 0 = off. probe_record: that example's
    # record id; "" = the first record of the val split.
    c.logging = ml_collections.ConfigDict(dict(every_steps=10, peak_tflops_per_device=0.0, probe_every_steps=0,
                                               probe_record=""))
    return c


def medsynapse_section():
    """MedSynapse-V's fields (arXiv 2604.26283 §2-3 defaults); `c.medsynapse = medsynapse_section()`.

    stages: which of ("warmup", "ccr", "imt") run, in this order (a prefix or an ordered subset starting at warmup).
    memory_position: where the N memory vectors enter the prompt (Eq. 1 puts them after Enc(q) and before y; the
      chat template's turn markers are the paper's silence): "assistant_turn" after `<|im_start|>assistant\n`, so
      y_1 is predicted from m_N's state; "user_turn" right after the question, before `<|im_end|>\n<|im_start|>
      assistant\n`, so y_1 is predicted from the assistant header's state as without memory (`medsynapse/memory.py`).
    encoder: E_ana, "siglip" (MedSigLIP / SigLIP patch grid) or "sam" (SAM-1 ViT, MedSAM's architecture); its
      directory is model.roi_encoder_dir (or the demo's SigLIP). store_dtype: of the stored feature maps.
    regions: where Eq. 5's removed region comes from ("record": the dataset's masks; "encoder": a mask head), the
      feature-cell coverage that puts a cell in a region, and how many regions are removed (Stage II's M').
    sampler: P_phi (N = 16 meta-queries, 2 cross-attention layers); output_rms scales its initial output to the
      token embeddings' size (0 = plain LeCun init).
    warmup: Stage I (Eq. 2), lr 2e-4 for 3 epochs, "sum" = the paper's summed answer NLL per example. max_steps caps
      the stage (0: all epochs).
    ccr: Stage II (Eq. 3-5), GRPO on LoRA adapters (rank 64, alpha 128, q/k/v/o): 200 steps of rollout_prompts
      prompts (0: data.batch_size; the paper's rollout batch is 32) x num_generations = 4 completions of up to
      1,024 tokens, lr 1e-5, clip 0.2, R = 1.0 r_acc + 0.5 r_causal, no KL term (kl_beta 0; the skeleton's 0.02
      with kl_estimator "k1" is an option). schedule "constant" or "warmup_cosine" (the paper gives none).
      closed_match / open_ended_match: how r_acc scores closed (yes/no, location choice) and open records
      (`medsynapse/reward.py`). logprob_chunk: completion positions per LM-head chunk in the scorer.
      num_updates: optimizer updates per rollout batch (a step stays one rollout batch).
    imt: Stage III (Eq. 6-8), A_psi trains: lr 1e-4 for 3 epochs (max_steps caps them), JSD beta 0.5, one on-policy
      rollout per example of up to max_new_tokens at `temperature`. A_psi: N = sampler.num_queries queries,
      an MLP of width mlp_hidden (0: the backbone's hidden size), output_rms its initial output scale (0: LeCun).
      memory_match: weight of a term the paper does not have, ||M_auto - M_pri||^2 / ||M_pri||^2 (0: off, Eq. 7
      alone; `medsynapse/imt.py`).
      init: where A_psi starts (the paper is silent): "teacher_mean" (its slot offsets at the per-slot mean of
      M_pri over the training images, fc2 at 0: the student starts as the teacher on an average image;
      `autonomous.teacher_mean_init`) or "random".
    rollout_relayout: the layout Stages II and III decode their rollouts in (`cached.decode`): unset (None)
      relays the backbone out once per rollout unless the mesh splits its weights; True / False force it. Relaid
      out, a model trained with scanned layers decodes ~1.9x faster on CPU and holds a copy of its text weights
      while the rollout runs (README, `scan_layers`); under FSDP, as held, every decode step all-gathers every
      layer again, which is why the 8B recipe sets True.
    """
    return ml_collections.ConfigDict(dict(
        stages=("warmup", "ccr", "imt"),
        memory_position="assistant_turn",
        rollout_relayout=config_dict.placeholder(bool),
        encoder=dict(kind="siglip", feature_layer="", dtype="float32", store_dtype="float32"),
        regions=dict(source="record", threshold=0.5, top_k=1),
        sampler=dict(num_queries=16, num_layers=2, num_heads=8, mlp_ratio=4, output_rms=0.02, dropout=0.0),
        warmup=dict(lr=2e-4, epochs=3, max_steps=0, weight_decay=0.01, warmup_ratio=0.03, max_grad_norm=1.0,
                    reduction="sum"),
        ccr=dict(steps=200, rollout_prompts=0, num_generations=4, max_new_tokens=1024,
                 lr=1e-5, schedule="constant", warmup_ratio=0.0, weight_decay=0.0, max_grad_norm=1.0,
                 clip_epsilon=0.2, kl_beta=0.0, kl_estimator="k3", num_updates=1,
                 temperature=1.0, top_p=1.0, top_k=0,
                 lambda_acc=1.0, lambda_causal=0.5, causal_reduction="sum", causal_clip=5.0,
                 closed_match="exact", open_ended_match="exact", logprob_chunk=128,
                 lora=dict(rank=64, alpha=128.0, targets=("q", "k", "v", "o"))),
        imt=dict(lr=1e-4, epochs=3, max_steps=0, schedule="warmup_cosine", warmup_ratio=0.03, weight_decay=0.01,
                 max_grad_norm=1.0, beta=0.5, max_new_tokens=1024, temperature=1.0, mlp_hidden=0,
                 output_rms=0.02, memory_match=0.0, init="teacher_mean"),
    ))
