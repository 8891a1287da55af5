"""Table 10 from the real Qwen3-VL-8B / Qwen3-1.7B configs (shapes only), and inference without scaffolding."""

import os

import jax
import numpy as np

from vital_jax.models.qwen3.config import Qwen3Config
from vital_jax.models.qwen3_vl.config import Qwen3VLConfig
from vital_jax.vital.accounting import account, format_table
from vital_jax.vital.config import VitalConfig
from vital_jax.vital.model import VitalModel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _paper_model():
    return VitalModel(VitalConfig(roi_dim=1152),
                      Qwen3VLConfig.from_pretrained(os.path.join(REPO, "configs/hf/qwen3_vl_8b_instruct")),
                      Qwen3Config.from_pretrained(os.path.join(REPO, "configs/hf/qwen3_1p7b")))


def test_parameter_counts_match_table_10():
    acc = account(_paper_model())
    # LoRA r=64 on q, k, v, o, gate, up, down of 36 layers: exact.
    per_layer = 64 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 12288) * 3)
    assert acc.lora == 36 * per_layer == 174_587_904
    # Eq. (5): W1 4096x4096 + b, W2 4096->1152 + b, two LayerNorms.
    assert acc.visual_projector == 4096 * 4096 + 4096 + 4096 * 1152 + 1152 + 2 * 4096 + 2 * 1152
    assert round(acc.visual_projector / 1e6, 1) == 21.5
    assert acc.pj_in == 4096 * 2048 + 2048 and round(acc.pj_in / 1e6, 2) == 8.39
    assert round(acc.text_decoder / 1e6, 1) == 1720.6
    assert round(acc.vision_encoder / 1e6, 1) == 576.4
    assert round(acc.llm_backbone / 1e6, 1) == 7568.4
    assert round(acc.paper_total / 1e6, 1) == 10069.9
    assert round(acc.trainable / 1e6, 1) == 1925.1
    assert "174,587,904" in format_table(acc)


def test_inference_needs_only_the_backbone(tmp_path):
    """generate() is given params['backbone'] alone; the scaffolding is not an input, so it cannot be touched."""
    from tests.vital.vital_fixtures import build, make_batch
    from vital_jax.generation import SamplingConfig

    tiny = build(tmp_path, k_max=2)
    batch, _ = make_batch(tiny.model, latent_steps=(1, 2))
    tokens, lengths, z = jax.jit(lambda bp, pre, k: tiny.model.generate(bp, pre, k, SamplingConfig(max_new_tokens=3)))(
        tiny.params["backbone"], batch.prefix, batch.latent_steps)
    assert tokens.shape == (2, 3) and z.shape == (2, 2, 64)
    jaxpr = jax.make_jaxpr(lambda bp: tiny.model.generate(bp, batch.prefix, batch.latent_steps,
                                                          SamplingConfig(max_new_tokens=3)))(tiny.params["backbone"])
    # The traced inference program's only inputs are the backbone's leaves (the batch is closed over).
    assert len(jaxpr.jaxpr.invars) == len(jax.tree.leaves(tiny.params["backbone"]))
    assert np.all(np.asarray(lengths) == 3)


def test_train_step_flops_count_each_part_once():
    """MFU's model FLOPs: LoRA 6N per backbone token, the frozen vision tower 2N per patch, linear in the batch."""
    import dataclasses

    from vital_jax.vital.accounting import train_step_flops

    paper = _paper_model()  # with 2 + 2 decoder layers: the count is per layer, and tracing 8B shapes is slow
    model = dataclasses.replace(
        paper, backbone_config=dataclasses.replace(
            paper.backbone_config, text=dataclasses.replace(paper.backbone_config.text, num_hidden_layers=2)),
        decoder_config=dataclasses.replace(paper.decoder_config, num_hidden_layers=2))
    acc = account(model)
    shape = dict(prompt_len=1024, answer_len=32, step_len=64)
    base = train_step_flops(model, acc, num_examples=2, num_patches=2 * 784, **shape)
    assert train_step_flops(model, acc, num_examples=4, num_patches=4 * 784, **shape) == 2 * base
    one_more_patch = train_step_flops(model, acc, num_examples=2, num_patches=2 * 784 + 1, **shape)
    assert one_more_patch - base == 2 * acc.vision_encoder
    no_lora = dataclasses.replace(acc, lora=0)
    without = train_step_flops(model, no_lora, num_examples=2, num_patches=2 * 784, **shape)
    tokens = 2 * (1024 + model.config.k_max + 32)
    assert acc.lora == 2 * 174_587_904 // 36
    assert base - without == 6 * acc.lora * tokens
    # Fewer latent slots: the decoder's share shrinks with them; without lambda_text it is not computed at all.
    fewer = train_step_flops(model, acc, num_examples=2, num_patches=2 * 784, latent_slots=1, **shape)
    assert fewer < base
    silent = dataclasses.replace(model, config=dataclasses.replace(model.config, lambda_text=0.0))
    no_text = train_step_flops(silent, acc, num_examples=2, num_patches=2 * 784, **shape)
    decoder_tokens = 2 * model.config.k_max * (64 + 1)
    assert base - no_text > 6 * (acc.text_decoder - model.decoder_config.vocab_size * model.decoder_config.hidden_size
                                 * (not model.decoder_config.tie_word_embeddings)) * decoder_tokens - 1
