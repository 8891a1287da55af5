"""MedSynapse-V (arXiv 2604.26283; ../shared/papers/medsynapse_v.txt), vital_jax's second latent-reasoning method.

A frozen anatomical encoder E_ana gives a spatial feature map; the Diagnostic Memory Sampler P_phi turns it into N
memory vectors that enter the backbone's sequence between the question and the answer, written into the same explicit
KV cache as VITAL's latent slots. Stage I aligns P_phi, Stage II refines the LoRA adapters with GRPO and a causal
counterfactual reward, Stage III distils the memory into an autonomous module A_psi so that inference needs no encoder.

Modules: encoder (E_ana interface and implementations), features (E_ana's maps stored once per dataset), sampler
(P_phi), memory (injection into the backbone), stage1 (Stage I), grpo + reward (Stage II), autonomous (A_psi), imt
(Stage III), trainer (the three stages as one resumable run, `load_trained`), deploy (inference without the
encoder), predict (answers with either memory branch, for `vital_jax.evaluate`).
"""
