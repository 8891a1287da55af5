"""Every shipped training config loads and validates; the ablation variants change what the paper's tables vary."""

import re

import pytest

from configs import ablation, base, demo, vital_qwen3vl_8b
from vital_jax import train
from vital_jax.models.hf_config import ConfigError


@pytest.mark.parametrize("get_config", [base.get_config, demo.get_config, vital_qwen3vl_8b.get_config])
def test_recipes_validate(get_config):
    train.validate_config(get_config())


def test_paper_recipe_follows_table_12():
    c = vital_qwen3vl_8b.get_config()
    assert (c.optimizer.lr, c.optimizer.warmup_ratio, c.optimizer.weight_decay) == (2e-5, 0.05, 0.01)
    assert (c.optimizer.b1, c.optimizer.b2, c.optimizer.max_grad_norm) == (0.9, 0.999, 1.0)
    assert (c.vital.lambda_text, c.vital.lambda_visual) == (1.0, 0.1)
    assert (c.vital.lora_rank, c.vital.lora_alpha, c.vital.lora_dropout) == (64, 128.0, 0.05)
    assert tuple(c.curriculum.max_k) == (1, 2, 4) and tuple(c.curriculum.epochs) == (5, 5, 10)
    assert c.model.dtype == "bfloat16"


@pytest.mark.parametrize("variant", ablation.VARIANTS)
def test_ablation_variants_validate(variant):
    c = ablation.get_config(variant)
    train.validate_config(c)
    default = ablation.get_config("three_phase")
    if variant == "task_only":
        assert (c.vital.lambda_text, c.vital.lambda_visual) == (0.0, 0.0)
    elif variant == "semantic":
        assert (c.vital.lambda_text, c.vital.lambda_visual) == (1.0, 0.0)
    elif variant == "visual":
        assert (c.vital.lambda_text, c.vital.lambda_visual) == (0.0, 0.1)
    elif variant.startswith("k"):
        assert c.vital.latent_steps_cap == int(variant[1:])
    elif variant == "reverse":
        assert tuple(c.curriculum.min_k) == (4, 2, 1)
    elif variant == "per_step":
        assert c.vital.visual_target == "interpolated" and train.pipeline_config(c).global_feature
    if variant != "per_step":
        assert not train.pipeline_config(c).global_feature
    if variant != "three_phase":
        assert c.to_dict() != default.to_dict()
    assert sum(c.curriculum.epochs) == sum(default.curriculum.epochs)


def test_unknown_ablation_and_bad_curriculum_are_errors():
    with pytest.raises(ValueError, match="unknown ablation"):
        ablation.get_config("nope")
    c = demo.get_config()
    c.curriculum.max_k = (1, 5)
    c.curriculum.epochs = (1, 1)
    with pytest.raises(ConfigError, match="max_k"):
        train.validate_config(c)
    c = demo.get_config()
    c.curriculum.min_k = (2, 1, 5)
    with pytest.raises(ConfigError, match="min_k"):
        train.validate_config(c)


@pytest.mark.parametrize("field,value,message", [
    ("data.batch_size", 0, "data.batch_size=0"),
    ("curriculum.epochs", (2, -1, 1), "epochs"),
    ("data.prompt_buckets", (), "prompt_buckets"),
    ("logging.every_steps", 0, "logging.every_steps=0"),
    ("checkpoint.keep", 0, "checkpoint.keep=0"),
    ("data.max_answer_tokens", -3, "data.max_answer_tokens=-3"),
])
def test_impossible_values_are_config_errors_before_anything_runs(field, value, message):
    c = demo.get_config()
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        train.validate_config(c)


def test_reverse_curriculum_selects_hard_records_first(demo_assets):
    import os

    from vital_jax.data.pipeline import select_records

    data = os.path.join(demo_assets, "data")
    hard = select_records(data, "train", 4, 4)
    assert hard and all(r.latent_steps == 4 for _, r in hard)
    assert len(select_records(data, "train", 4, 2)) > len(hard)


@pytest.mark.parametrize("name", ["demo_phantoms", "phantom_vqa", "biomedparse", "msd"])
def test_data_configs_set_only_fields_the_builder_reads(name):
    import importlib

    from vital_jax.data.build_config import default_config

    config = importlib.import_module(f"configs.data.{name}").get_config()
    defaults = default_config()

    def fields(c, prefix=""):
        return {f"{prefix}{k}" for k, v in c.items()} | {f for k, v in c.items() if hasattr(v, "items")
                                                         for f in fields(v, f"{prefix}{k}.")}

    assert fields(config) == fields(defaults)
    assert config.source in ("phantoms", "biomedparse", "msd", "dicom")
