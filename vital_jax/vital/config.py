"""VITAL hyper-parameters (paper §3, §4.1, Appendix B)."""

from __future__ import annotations

import dataclasses

from vital_jax.layers.linear import LoraConfig


LATENT_INPUTS = ("feedback", "pause")
TASK_LOSS_REDUCTIONS = ("token", "example")


@dataclasses.dataclass(frozen=True)
class VitalConfig:
    """k_max: latent-step slots compiled into the scan (each example uses its own K <= k_max).

    visual_loss_reduction: how Eq. (6)'s ||.||_1 is reduced over the dv dimensions. "mean" (default) is the
      element mean (PyTorch `l1_loss`), which keeps lambda_visual * L_visual comparable to L_task; "sum" is the
      literal L1 norm, ~dv times larger at initialisation (see shared NOTES on this ambiguity).
    task_loss_reduction: how L_task, "the standard next-token cross-entropy loss computed only over answer tokens"
      (§3.5), is averaged over the batch. "token" (default): the mean over every valid answer token of the batch,
      the standard causal-LM loss (transformers' `ForCausalLMLoss` with the other labels ignored), so a long answer
      weighs by its tokens. "example": each answer's token mean, then the mean over examples (every answer weighs
      the same; what vital_jax did before this field existed, and what runs recorded without it resume with).
    visual_target: "shared" (Eq. 6, every step regresses f_ROI) or "interpolated" (Appendix C.5, Eq. 8: step k of
      K regresses Normalize(a_k f_ROI + (1 - a_k) f_global) with a_k = (k-1)/(K-1), a_1 = 1 when K = 1).
    remat_latent_steps: recompute each latent step's activations in the backward pass (saves memory ~K_max x).
    latent_steps_cap: -1 (default) uses each record's K; c >= 0 uses min(K, c) — the paper's Table 3 "K" rows
      (c = 0 is the direct-answer baseline: no latent step, so no L_text / L_visual).
    latent_input: what enters latent slot k. "feedback" (Eq. 1): z_{k-1}, the previous step's last hidden state.
      "pause": a learned constant vector p_k (K_max x D, `params["pause_embeddings"]`), the pause-token control of
      the small-scale Coconut replications: the same slots, supervision and curriculum without the recurrence, so
      a gain of "feedback" over "pause" is the latent loop's own, not extra positions or the curriculum.
    """

    k_max: int = 4
    lambda_text: float = 1.0
    lambda_visual: float = 0.1
    roi_dim: int = 1152
    vp_dropout: float = 0.1
    visual_loss_reduction: str = "mean"
    task_loss_reduction: str = "token"
    visual_target: str = "shared"
    lora: LoraConfig | None = LoraConfig(rank=64, alpha=128.0, dropout=0.05)
    remat_latent_steps: bool = False
    train_decoder: bool = True
    latent_steps_cap: int = -1
    latent_input: str = "feedback"

    def __post_init__(self):
        if self.visual_loss_reduction not in ("mean", "sum"):
            raise ValueError(f"visual_loss_reduction must be 'mean' or 'sum', got {self.visual_loss_reduction!r}")
        if self.task_loss_reduction not in TASK_LOSS_REDUCTIONS:
            raise ValueError(f"task_loss_reduction must be one of {TASK_LOSS_REDUCTIONS}, got "
                             f"{self.task_loss_reduction!r}")
        if self.visual_target not in ("shared", "interpolated"):
            raise ValueError(f"visual_target must be 'shared' or 'interpolated', got {self.visual_target!r}")
        if self.latent_input not in LATENT_INPUTS:
            raise ValueError(f"latent_input must be one of {LATENT_INPUTS}, got {self.latent_input!r}")
        if self.k_max < 0:
            raise ValueError(f"k_max must be >= 0, got {self.k_max}")
