"""The VITAL method (arXiv 2605.28422): latent recurrence over the KV cache, dual supervision, joint loss.

  config.py     VitalConfig (K_max, loss weights, LoRA, visual-loss options)
  latent.py     Eq. (1)-(2): prefix cache, the K-step latent scan, answer decoding (training and inference)
  heads.py      Eq. (5) visual projector, pj_in of Eq. (3)
  losses.py     Eq. (4), (6), (7) and L_task
  model.py      VitalModel: parameters, the training forward with all losses, inference
  trainable.py  LoRA/trainable masks, the masked optax optimizer, LoRA merge
  interpret.py  dual interpretability and collapse diagnostics
"""
