"""VitalModel: the backbone (+ LoRA), the scaffolding (auxiliary decoder, pj_in, visual projector), the
training forward with every loss term, and inference.

Parameters are one dict: {"backbone", "decoder", "pj_in", "visual_projector"} (+ "pause_embeddings" (K_max, D)
for the pause control, `VitalConfig.latent_input = "pause"`). Inference (`generate`) takes only
`params["backbone"]` (and the pause vectors of a pause run): the scaffolding is discarded at deployment (§3.5).
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vital_jax import generation
from vital_jax.layers.linear import LORA_A_INIT
from vital_jax.models.hf_mapping import flatten, unflatten
from vital_jax.models.qwen3.config import Qwen3Config
from vital_jax.models.qwen3.modeling import Qwen3ForCausalLM
from vital_jax.models.qwen3_vl import params as qwen3_vl_params
from vital_jax.models.qwen3_vl.config import Qwen3VLConfig
from vital_jax.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration
from vital_jax.vital import latent, losses
from vital_jax.vital.batch import VitalBatch
from vital_jax.vital.config import VitalConfig
from vital_jax.vital.heads import PjIn, VisualProjector


@flax.struct.dataclass
class VitalOutputs:
    """Everything the training forward computes. Per-example terms are (B,); `*_weight` says who counts."""

    loss: jax.Array
    task_loss: jax.Array
    text_loss: jax.Array
    visual_loss: jax.Array
    task_per_example: jax.Array
    text_per_example: jax.Array
    visual_per_example: jax.Array
    z: jax.Array  # (B, K, D) latent states, K = the batch's step slots (<= K_max)
    z0: jax.Array  # (B, D)
    answer_logits: jax.Array  # (B, Ta, V)
    valid_steps: jax.Array  # (B, K)


@dataclasses.dataclass(frozen=True)
class VitalModel:
    config: VitalConfig
    backbone_config: Qwen3VLConfig
    decoder_config: Qwen3Config

    @property
    def backbone(self) -> Qwen3VLForConditionalGeneration:
        return Qwen3VLForConditionalGeneration(self.backbone_config, self.config.lora)

    @property
    def decoder(self) -> Qwen3ForCausalLM:
        return Qwen3ForCausalLM(self.decoder_config)

    @property
    def visual_projector(self) -> VisualProjector:
        text = self.backbone_config.text
        return VisualProjector(self.config.roi_dim, self.config.vp_dropout, text.dtype, jnp.float32)

    @property
    def pj_in(self) -> PjIn:
        return PjIn(self.decoder_config.hidden_size, self.decoder_config.dtype, jnp.float32)

    # ----------------------------------------------------------------------------------------- parameters
    def abstract_params(self) -> dict:
        """The full parameter tree as ShapeDtypeStructs (no weights): for accounting and checkpoint restore."""
        d = self.backbone_config.text.hidden_size
        decoder = self.decoder
        scaffolding = jax.eval_shape(lambda: {
            "decoder": decoder.init(jax.random.PRNGKey(0), input_ids=jnp.zeros((1, 1), jnp.int32))["params"],
            "pj_in": self.pj_in.init(jax.random.PRNGKey(0), jnp.zeros((1, d)))["params"],
            "visual_projector": self.visual_projector.init(jax.random.PRNGKey(0), jnp.zeros((1, d)))["params"],
        })
        out = {"backbone": qwen3_vl_params.abstract_params(self.backbone_config, self.config.lora), **scaffolding}
        if self.config.latent_input == "pause":
            out["pause_embeddings"] = jax.ShapeDtypeStruct((self.config.k_max, d), jnp.float32)
        return out

    def init_params(self, rng: jax.Array, backbone_params: dict, decoder_params: dict | None = None) -> dict:
        """Assemble parameters: the converted backbone plus fresh LoRA adapters (B = 0, so the adapted model
        starts equal to the base model), the decoder (converted, or random when None), fresh pj_in and VP."""
        rng_lora, rng_dec, rng_pj, rng_vp = jax.random.split(rng, 4)
        abstract = self.abstract_params()
        backbone = add_missing_lora(rng_lora, backbone_params, abstract["backbone"])
        d = self.backbone_config.text.hidden_size
        if decoder_params is None:
            decoder_params = self.decoder.init(rng_dec, input_ids=jnp.zeros((1, 1), jnp.int32))["params"]
        params = {
            "backbone": backbone,
            "decoder": decoder_params,
            "pj_in": self.pj_in.init(rng_pj, jnp.zeros((1, d)))["params"],
            "visual_projector": self.visual_projector.init(rng_vp, jnp.zeros((1, d)))["params"],
        }
        if self.config.latent_input == "pause":
            # Scaled like token embeddings (normal, std 0.02), so a pause slot starts as an ordinary input.
            pause_rng = jax.random.fold_in(rng_vp, 1)
            params["pause_embeddings"] = 0.02 * jax.random.normal(pause_rng, (self.config.k_max, d), jnp.float32)
        return params

    # ------------------------------------------------------------------------------------------- training
    def forward(self, params: dict, batch: VitalBatch, deterministic: bool = True, rng=None) -> VitalOutputs:
        """Prefix -> K-step latent scan -> teacher-forced answer, and the three supervision terms (Eq. 7).

        The batch's step slots (batch.step_ids.shape[1], <= config.k_max) are the latent slots compiled into the
        program: a curriculum phase with K <= 1 runs one slot, not K_max (`slice_latent_slots`); every example's
        latent_steps (after latent_steps_cap) must fit them. A term whose weight (lambda_text, lambda_visual) is 0
        is not computed: its per-example value and batch loss are 0 (its weight False), and the train step does
        not log it.
        """
        cfg = self.config
        backbone, bp = self.backbone, params["backbone"]
        prefix = batch.prefix
        k_max = batch.step_ids.shape[1]  # the latent slots of this program
        if k_max > cfg.k_max:
            raise ValueError(f"the batch has {k_max} latent step slots; the config's k_max is {cfg.k_max}")
        ta = batch.answer_ids.shape[1]
        if ta < 2:
            raise ValueError("answers need >= 2 token slots (the answer and <|im_end|>)")
        if cfg.latent_steps_cap >= 0:
            batch = batch.replace(latent_steps=jnp.minimum(batch.latent_steps, cfg.latent_steps_cap))
        rngs = (None,) * 4 if rng is None else jax.random.split(rng, 4)
        cache_len = prefix.input_ids.shape[1] + k_max + ta
        kv_cache, z0 = latent.encode_prefix(backbone, bp, prefix, cache_len, deterministic, rngs[0])
        z, z_last, kv_cache = latent.latent_loop(backbone, bp, kv_cache, z0, batch.latent_steps, k_max,
                                                 deterministic, rngs[1], cfg.remat_latent_steps,
                                                 pause_embeddings=params.get("pause_embeddings"))
        logits = latent.answer_logits(backbone, bp, kv_cache, z_last, batch.answer_ids, batch.answer_valid,
                                      deterministic, rngs[2])
        task, task_w = losses.task_loss(logits, batch.answer_ids, batch.answer_valid)
        valid_steps = losses.step_mask(batch.latent_steps, k_max)
        # A zero-weighted term would cost the auxiliary decoder's forward and backward over B x K slots (more
        # tokens than the backbone's at the study's sizes) for a loss that moves nothing.
        off = (jnp.zeros(task.shape, jnp.float32), jnp.zeros(task.shape, bool))
        text, text_w = (self._text_loss(params, z, batch, valid_steps) if cfg.lambda_text != 0 and k_max
                        else off)
        visual, visual_w = (self._visual_loss(params, z, batch, valid_steps, deterministic, rngs[3])
                            if cfg.lambda_visual != 0 and k_max else off)
        ex = batch.example_valid
        if cfg.task_loss_reduction == "token":
            l_task = losses.token_mean(task, batch.answer_valid.sum(axis=-1), task_w & ex)
        else:
            l_task = losses.weighted_mean(task, task_w & ex)
        l_text = losses.weighted_mean(text, text_w & ex)
        l_visual = losses.weighted_mean(visual, visual_w & ex)
        total = losses.joint_loss(l_task, l_text, l_visual, cfg.lambda_text, cfg.lambda_visual)
        return VitalOutputs(total, l_task, l_text, l_visual, task, text, visual, z, z0, logits, valid_steps)

    def _text_loss(self, params, z, batch: VitalBatch, valid_steps):
        """Eq. (3)-(4): decoder input [pj_in(z_k); Embed_dec(e_k)], all B x K sequences (K slots) in one batch."""
        b, k, ts = batch.step_ids.shape
        decoder = self.decoder
        h0 = self.pj_in.apply({"params": params["pj_in"]}, z)  # (B, K, Ddec)
        emb = decoder.apply({"params": params["decoder"]}, batch.step_ids, method=decoder.embed)
        x = jnp.concatenate([h0[:, :, None].astype(emb.dtype), emb], axis=2).reshape(b * k, ts + 1, -1)
        tok_valid = batch.step_valid & valid_steps[..., None]
        valid = jnp.concatenate([valid_steps[..., None], tok_valid], axis=2).reshape(b * k, ts + 1)
        out = decoder.apply({"params": params["decoder"]}, inputs_embeds=x, token_valid=valid)
        step_logits = out.logits[:, :-1].reshape(b, k, ts, -1)
        return losses.text_loss(step_logits, batch.step_ids, batch.step_valid, valid_steps)

    def _visual_loss(self, params, z, batch: VitalBatch, valid_steps, deterministic, rng):
        """Eq. (5)-(6): the projector maps each z_k to the vision-encoder space and regresses f_ROI."""
        projected = self.visual_projector.apply({"params": params["visual_projector"]}, z, deterministic,
                                                rngs={} if rng is None else {"dropout": rng})
        targets = batch.roi_feature
        if self.config.visual_target == "interpolated":
            if batch.global_feature is None:
                raise ValueError("visual_target='interpolated' needs batch.global_feature (Appendix C.5)")
            targets = losses.interpolated_targets(batch.roi_feature, batch.global_feature, batch.latent_steps,
                                                  z.shape[1])
        return losses.visual_loss(projected, targets, valid_steps, self.config.visual_loss_reduction)

    # ------------------------------------------------------------------------------------------ inference
    def generate(self, backbone_params: dict, prefix, latent_steps: jax.Array,
                 sampling: generation.SamplingConfig, rng=None, k_slots: int | None = None,
                 pause_embeddings: jax.Array | None = None):
        """Inference with the backbone (+ LoRA) alone: returns (tokens (B, N), lengths (B,), z (B, k_slots, D)).

        k_slots (static, default K_max) is the number of latent steps compiled into the program; examples use
        `latent_steps` <= k_slots. One program serves every K (masked steps still cost compute); for latency
        measurements at a single K, pass k_slots = K so the program runs exactly K steps.
        pause_embeddings: `params["pause_embeddings"]`, required exactly when config.latent_input == "pause".
        """
        if (pause_embeddings is None) != (self.config.latent_input != "pause"):
            raise ValueError(f"latent_input={self.config.latent_input!r}: pause_embeddings must be given exactly "
                             "for the pause control")
        k_slots = self.config.k_max if k_slots is None else k_slots
        return latent.generate_answer(self.backbone, backbone_params, prefix, latent_steps, k_slots, sampling, rng,
                                      pause_embeddings=pause_embeddings)


def add_missing_lora(rng: jax.Array, params: dict, abstract: dict) -> dict:
    """Fill the LoRA leaves that `abstract` has and `params` lacks: lora_a ~ U(+-1/sqrt(in)), lora_b = 0.

    Any other difference between the two trees is an error (a backbone of another shape).
    """
    have, want = flatten(params), flatten(abstract)
    problems = [p for p in want if p not in have and not p.rsplit("/", 1)[-1].startswith("lora_")]
    problems += [f"unexpected {p}" for p in have if p not in want]
    problems += [f"{p}: {tuple(have[p].shape)} != {tuple(want[p].shape)}" for p in have
                 if p in want and tuple(have[p].shape) != tuple(want[p].shape)]
    if problems:
        raise ValueError("backbone params do not match the backbone config: " + "; ".join(problems[:10]))
    out = dict(have)
    for i, (path, spec) in enumerate(sorted((p, s) for p, s in want.items() if p not in have)):
        if path.endswith("lora_a"):
            out[path] = LORA_A_INIT(jax.random.fold_in(rng, i), spec.shape, spec.dtype)
        else:
            out[path] = jnp.zeros(spec.shape, spec.dtype)
    return unflatten(out)


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
