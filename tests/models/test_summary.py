"""Shape-only parameter counts of the shipped real-size configs against the paper and transformers.

Paper numbers (VITAL, Appendix B): Table 9/10 give the Qwen3-VL-8B vision encoder as 576.4M and the LLM backbone
as 7,568.4M; Tables 10/11 give Qwen3-1.7B as 1,720.6M = embed_tokens 311.16M + transformer layers 1,409.41M
(lm_head tied). Everything here is jax.eval_shape or torch's meta device: no weights are allocated.
"""

import os

import jax
import jax.numpy as jnp
import pytest
import torch
import transformers

from vital_jax.models import summary as summary_lib
from vital_jax.models.qwen3 import Qwen3Config
from vital_jax.models.qwen3_vl import Qwen3VLConfig
from vital_jax.models.siglip.config import SiglipVisionConfig

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs", "hf")
QWEN3_VL_8B = os.path.join(CONFIGS, "qwen3_vl_8b_instruct")
QWEN3_1P7B = os.path.join(CONFIGS, "qwen3_1p7b")
MEDSIGLIP_448 = os.path.join(CONFIGS, "medsiglip_448")


def millions(count: int, decimals: int = 1) -> float:
    return round(count / 1e6, decimals)


def hf_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def qwen3_vl_8b():
    return summary_lib.summarize(QWEN3_VL_8B, depth=3)


@pytest.fixture(scope="module")
def qwen3_1p7b():
    return summary_lib.summarize(QWEN3_1P7B, depth=2)


# ------------------------------------------------------------------------------------------------------------
# The shipped configs
# ------------------------------------------------------------------------------------------------------------


def test_qwen3_vl_8b_config_reads_the_same_in_vital_jax_and_transformers():
    ours = Qwen3VLConfig.from_pretrained(QWEN3_VL_8B)
    hf = transformers.AutoConfig.from_pretrained(QWEN3_VL_8B)
    text, vision = hf.text_config, hf.vision_config
    assert (ours.text.hidden_size, ours.text.num_hidden_layers, ours.text.num_attention_heads,
            ours.text.num_key_value_heads, ours.text.head_dim, ours.text.intermediate_size, ours.text.vocab_size) == (
        text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
        text.head_dim, text.intermediate_size, text.vocab_size)
    assert ours.text.rope_theta == text.rope_parameters["rope_theta"]
    assert list(ours.mrope_section) == text.rope_parameters["mrope_section"]
    assert ours.text.tie_word_embeddings is False and hf.tie_word_embeddings is False
    assert (ours.vision.depth, ours.vision.hidden_size, ours.vision.num_heads, ours.vision.intermediate_size,
            ours.vision.patch_size, ours.vision.out_hidden_size, ours.vision.num_position_embeddings) == (
        vision.depth, vision.hidden_size, vision.num_heads, vision.intermediate_size, vision.patch_size,
        vision.out_hidden_size, vision.num_position_embeddings)
    assert list(ours.vision.deepstack_visual_indexes) == list(vision.deepstack_visual_indexes)
    assert (ours.image_token_id, ours.vision_start_token_id, ours.vision_end_token_id) == (
        hf.image_token_id, hf.vision_start_token_id, hf.vision_end_token_id)


def test_qwen3_1p7b_config_reads_the_same_in_vital_jax_and_transformers():
    ours = Qwen3Config.from_pretrained(QWEN3_1P7B)
    hf = transformers.AutoConfig.from_pretrained(QWEN3_1P7B)
    assert (ours.hidden_size, ours.num_hidden_layers, ours.num_attention_heads, ours.num_key_value_heads,
            ours.head_dim, ours.intermediate_size, ours.vocab_size, ours.tie_word_embeddings) == (
        hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim,
        hf.intermediate_size, hf.vocab_size, hf.tie_word_embeddings)
    assert ours.rope_theta == hf.rope_parameters["rope_theta"]
    assert ours.tie_word_embeddings is True


def test_medsiglip_config_reads_the_same_in_vital_jax_and_transformers():
    ours = SiglipVisionConfig.from_pretrained(MEDSIGLIP_448)
    hf = transformers.AutoConfig.from_pretrained(MEDSIGLIP_448).vision_config
    assert (ours.hidden_size, ours.num_hidden_layers, ours.num_attention_heads, ours.intermediate_size,
            ours.patch_size, ours.image_size, ours.hidden_act, ours.layer_norm_eps) == (
        hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.intermediate_size, hf.patch_size,
        hf.image_size, hf.hidden_act, hf.layer_norm_eps)
    assert ours.num_patches == 32 * 32  # the paper's 32x32 = 1,024-patch ROI grid


# ------------------------------------------------------------------------------------------------------------
# Paper Tables 9-11
# ------------------------------------------------------------------------------------------------------------


def test_qwen3_vl_8b_vision_encoder_is_576_4m_with_both_mergers(qwen3_vl_8b):
    # The paper counts the patch merger and the three deepstack mergers in the vision encoder: without them the
    # ViT alone is ~415.9M, with them 576.4M as in Table 10 (and "576M" in Table 9).
    visual = qwen3_vl_8b.count("visual")
    assert millions(visual) == 576.4
    mergers = qwen3_vl_8b.count("visual.merger") + qwen3_vl_8b.count("visual.deepstack_merger_list")
    assert millions(visual - mergers) != 576.4


def test_qwen3_vl_8b_llm_backbone_is_7568_4m_without_the_untied_lm_head(qwen3_vl_8b):
    # Table 10's "LLM Backbone 7,568.4M" is language_model (embed_tokens + 36 layers + final norm) alone. Qwen3-VL-8B
    # has tie_word_embeddings=false, so lm_head is a separate vocab x hidden matrix (622.3M) that the paper leaves
    # out: its "de-duplicated 8.14B" = vision + language_model assumes lm_head is tied to embed_tokens. The real
    # checkpoint holds vision + language_model + lm_head = 8,767.1M (what transformers counts too, below), and the
    # paper's 10,069.9M total under-counts by the same 622.3M.
    config = Qwen3VLConfig.from_pretrained(QWEN3_VL_8B)
    language_model, lm_head = qwen3_vl_8b.count("language_model"), qwen3_vl_8b.count("lm_head")
    assert millions(language_model) == 7568.4
    assert lm_head == config.text.vocab_size * config.text.hidden_size
    assert millions(language_model + lm_head) != 7568.4
    assert round((qwen3_vl_8b.count("visual") + language_model) / 1e9, 2) == 8.14
    assert qwen3_vl_8b.total == qwen3_vl_8b.count("visual") + language_model + lm_head


def test_qwen3_1p7b_is_1720_6m_tied_as_in_table_11(qwen3_1p7b):
    assert millions(qwen3_1p7b.total) == 1720.6  # Table 10
    assert millions(qwen3_1p7b.total, 2) == 1720.57  # Table 11
    assert millions(qwen3_1p7b.count("embed_tokens"), 2) == 311.16
    assert millions(qwen3_1p7b.count("model.layers"), 2) == 1409.41
    assert qwen3_1p7b.tied_embeddings
    assert "lm_head" not in {row.path for row in qwen3_1p7b.rows}


# ------------------------------------------------------------------------------------------------------------
# Against transformers on the meta device
# ------------------------------------------------------------------------------------------------------------


def test_qwen3_vl_8b_counts_match_transformers(qwen3_vl_8b):
    with torch.device("meta"):
        hf = transformers.Qwen3VLForConditionalGeneration(transformers.AutoConfig.from_pretrained(QWEN3_VL_8B))
    assert qwen3_vl_8b.total == hf_count(hf)
    assert qwen3_vl_8b.count("visual") == hf_count(hf.model.visual)
    assert qwen3_vl_8b.count("language_model") == hf_count(hf.model.language_model)
    assert qwen3_vl_8b.count("language_model.model.layers") == hf_count(hf.model.language_model.layers)


def test_qwen3_1p7b_counts_match_transformers(qwen3_1p7b):
    with torch.device("meta"):
        hf = transformers.Qwen3ForCausalLM(transformers.AutoConfig.from_pretrained(QWEN3_1P7B))
    # transformers ties lm_head.weight to embed_tokens.weight, and parameters() yields a shared tensor once.
    assert qwen3_1p7b.total == hf_count(hf)
    assert qwen3_1p7b.count("model.layers") == hf_count(hf.model.layers)


def test_medsiglip_vision_tower_count_matches_transformers_siglip_vision_model():
    summary = summary_lib.summarize(MEDSIGLIP_448, depth=1)
    with torch.device("meta"):
        hf = transformers.SiglipVisionModel(transformers.AutoConfig.from_pretrained(MEDSIGLIP_448).vision_config)
    assert summary.family == "siglip"
    assert summary.total == hf_count(hf)
    # The MAP head only produces pooler_output; the ROI features come from the tower without it.
    assert summary.total - summary.count("head") == hf_count(hf) - hf_count(hf.head)


# ------------------------------------------------------------------------------------------------------------
# The summary itself
# ------------------------------------------------------------------------------------------------------------


def test_module_rows_merge_numbered_siblings_and_stop_at_depth():
    def dense(n_in, n_out):
        return {"kernel": _shape(n_in, n_out), "bias": _shape(n_out)}

    tree = {"layers_0": {"mlp": dense(2, 3), "norm": {"scale": _shape(2)}},
            "layers_1": {"mlp": dense(2, 3), "norm": {"scale": _shape(2)}},
            "layers_10": {"mlp": dense(2, 3), "norm": {"scale": _shape(2)}},
            "head": dense(2, 5), "logit_scale": _shape(1)}
    rows = summary_lib.module_rows(tree, depth=2)
    assert [(r.path, r.count, r.repeats, r.depth) for r in rows] == [
        ("layers", 3 * (9 + 2), 3, 1), ("layers.mlp", 27, 1, 2), ("layers.norm", 6, 1, 2), ("head", 15, 1, 1)]
    assert [r.path for r in summary_lib.module_rows(tree, depth=1)] == ["layers", "head"]
    assert summary_lib.count_params(tree) == 33 + 15 + 1


def test_cli_prints_millions_with_one_decimal(capsys):
    assert summary_lib.main([f"--config_dir={QWEN3_VL_8B}", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "7,568.4M" in lines["language_model"]
    assert "576.4M" in lines["visual"]
    assert "visual.blocks" not in out  # depth 1


def test_cli_reports_an_unknown_model_type(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert summary_lib.main([f"--config_dir={tmp_path}"]) == 1
    assert "'llama' is not supported" in capsys.readouterr().err


def _shape(*dims):
    return jax.ShapeDtypeStruct(dims, jnp.float32)
