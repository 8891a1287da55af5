"""Parameter accounting of a VITAL model from configs alone (`jax.eval_shape`, no weights): the paper's Table 10.

    python -m vital_jax.vital.accounting [--backbone_config=configs/hf/qwen3_vl_8b_instruct]
                                         [--decoder_config=configs/hf/qwen3_1p7b] [--roi_dim=1152]

Table 10 lists the LLM backbone as `language_model` (7,568.4M) and treats the LM head as tied; Qwen3-VL-8B's
head is untied (622.3M), so it is printed on its own row, outside the paper's de-duplicated total.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from vital_jax.models.hf_mapping import flatten
from vital_jax.models.qwen3.config import Qwen3Config
from vital_jax.models.qwen3_vl.config import Qwen3VLConfig
from vital_jax.vital.config import VitalConfig
from vital_jax.vital.model import VitalModel
from vital_jax.vital.trainable import is_trainable


@dataclasses.dataclass(frozen=True)
class Accounting:
    vision_encoder: int
    llm_backbone: int
    lm_head: int
    lora: int
    visual_projector: int
    pj_in: int
    text_decoder: int

    @property
    def paper_total(self) -> int:
        """Table 10's de-duplicated total (without the untied LM head)."""
        return (self.vision_encoder + self.llm_backbone + self.lora + self.visual_projector + self.pj_in
                + self.text_decoder)

    @property
    def trainable(self) -> int:
        return self.lora + self.visual_projector + self.pj_in + self.text_decoder

    @property
    def inference(self) -> int:
        """What is deployed: backbone + LoRA (the scaffolding is discarded)."""
        return self.vision_encoder + self.llm_backbone + self.lm_head + self.lora


def account(model: VitalModel) -> Accounting:
    counts: dict[str, int] = {}
    for path, spec in flatten(model.abstract_params()).items():
        n = int(np.prod(spec.shape))
        parts = path.split("/")
        if parts[0] == "backbone":
            if parts[-1].startswith("lora_"):
                key = "lora"
            else:
                key = {"visual": "vision_encoder", "language_model": "llm_backbone", "lm_head": "lm_head"}[parts[1]]
        else:
            key = {"decoder": "text_decoder", "pj_in": "pj_in", "visual_projector": "visual_projector"}[parts[0]]
        counts[key] = counts.get(key, 0) + n
        assert is_trainable(path) == (key in ("lora", "text_decoder", "pj_in", "visual_projector")), path
    counts.setdefault("lm_head", 0)
    counts.setdefault("lora", 0)
    return Accounting(**counts)


def train_step_flops(model: VitalModel, acc: Accounting, num_examples: int, prompt_len: int, num_patches: int,
                     answer_len: int, step_len: int, latent_slots: int | None = None) -> float:
    """Model FLOPs of one VITAL train step from the shapes (no remat recompute), for MFU.

    `acc` = `account(model)` (computed once). Per token of the backbone LLM (prompt, K latent steps, answer):
    4 N_body (frozen: forward 2N + activation gradients 2N, no weight gradients) + 6 N_lora; the LM head only on
    answer tokens (the prefix and latent steps compute no logits); the frozen vision tower 2 N_vis per patch
    (forward only: nothing upstream of it trains); the trained decoder 6 N_dec per token of its B x K
    step chains (N_dec counts its LM head once, tied or not); pj_in and the projector 6 N per latent step;
    attention 2 * 2 * S_q * S_kv * d per layer, halved for causality, x 2 in the frozen backbone and x 3 in the
    decoder. Shapes are the padded ones the step computes on. K = `latent_slots` (default K_max): every slot the
    program runs is computed. A loss term with weight 0 is not computed (`VitalModel.forward`), so neither is its
    head: the decoder without lambda_text, the projector without lambda_visual.
    """
    text, dec = model.backbone_config.text, model.decoder_config
    k = model.config.k_max if latent_slots is None else latent_slots
    with_text, with_visual = model.config.lambda_text != 0, model.config.lambda_visual != 0
    embedding = text.vocab_size * text.hidden_size
    head = acc.lm_head if acc.lm_head else embedding
    seq = prompt_len + k + answer_len
    flops = num_examples * seq * (4 * (acc.llm_backbone - embedding) + 6 * acc.lora)
    flops += num_examples * answer_len * 4 * head
    flops += 2 * acc.vision_encoder * num_patches
    dec_embedding = dec.vocab_size * dec.hidden_size * (not dec.tie_word_embeddings)
    dec_tokens = num_examples * k * (step_len + 1) * with_text
    flops += 6 * (acc.text_decoder - dec_embedding) * dec_tokens
    flops += 6 * (acc.visual_projector * with_visual + acc.pj_in * with_text) * num_examples * k
    attn = 2 * 2 * seq * seq / 2 * text.num_attention_heads * text.head_dim * text.num_hidden_layers * num_examples
    attn_dec = (2 * 2 * (step_len + 1) ** 2 / 2 * dec.num_attention_heads * dec.head_dim * dec.num_hidden_layers
                * num_examples * k * with_text)
    return float(flops + 2 * attn + 3 * attn_dec)


def format_table(acc: Accounting) -> str:
    m = lambda n: f"{n / 1e6:,.1f}M"  # noqa: E731
    rows = [("Vision Encoder", acc.vision_encoder, 0, "Frozen"), ("LLM Backbone", acc.llm_backbone, 0, "Frozen"),
            ("  + LoRA", acc.lora, acc.lora, "Trained"),
            ("Visual Projector (scaffolding)", acc.visual_projector, acc.visual_projector, "Trained"),
            ("Projection pj_in (scaffolding)", acc.pj_in, acc.pj_in, "Trained"),
            ("Text Decoder (scaffolding)", acc.text_decoder, acc.text_decoder, "Trained")]
    lines = [f"{'Module':32s} {'#Params':>12s} {'#Trainable':>12s}  Status"]
    lines += [f"{name:32s} {m(n):>12s} {m(t):>12s}  {status}" for name, n, t, status in rows]
    lines.append(f"{'Total (de-duplicated)':32s} {m(acc.paper_total):>12s} {m(acc.trainable):>12s}  "
                 f"({100 * acc.trainable / acc.paper_total:.1f}%)")
    if acc.lm_head:
        lines.append(f"{'untied LM head (not in Table 10)':32s} {m(acc.lm_head):>12s} {m(0):>12s}  Frozen")
    lines.append(f"LoRA exactly: {acc.lora:,}; inference (backbone + LoRA): {m(acc.inference)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vital_jax.vital.accounting", description=__doc__.split("\n")[0])
    parser.add_argument("--backbone_config", default="configs/hf/qwen3_vl_8b_instruct")
    parser.add_argument("--decoder_config", default="configs/hf/qwen3_1p7b")
    parser.add_argument("--roi_dim", type=int, default=1152)
    parser.add_argument("--lora_rank", type=int, default=64)
    args = parser.parse_args(argv)
    from vital_jax.layers.linear import LoraConfig
    cfg = VitalConfig(roi_dim=args.roi_dim, lora=LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank))
    model = VitalModel(cfg, Qwen3VLConfig.from_pretrained(args.backbone_config),
                       Qwen3Config.from_pretrained(args.decoder_config))
    print(format_table(account(model)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
