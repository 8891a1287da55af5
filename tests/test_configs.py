"""Every shipped training config loads and validates; the ablation variants change what the paper's tables vary."""

import re

import ml_collections
import pytest

from configs import ablation, base, demo, medsynapse_demo, medsynapse_qwen3vl_8b, vital_qwen3vl_8b
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


@pytest.mark.parametrize("get_config", [medsynapse_demo.get_config, medsynapse_qwen3vl_8b.get_config])
def test_medsynapse_recipes_validate(get_config):
    from vital_jax.medsynapse import trainer

    c = get_config()
    trainer.validate_config(c)
    assert tuple(c.medsynapse.stages) == trainer.STAGES
    with pytest.raises(ConfigError, match="method"):  # VITAL's trainer refuses another method's config
        train.validate_config(c)


def test_medsynapse_paper_recipe_follows_section_3():
    c = medsynapse_qwen3vl_8b.get_config()
    m = c.medsynapse
    assert (m.sampler.num_queries, m.sampler.num_layers) == (16, 2)
    assert (m.warmup.lr, m.warmup.epochs) == (2e-4, 3)
    ccr = m.ccr
    assert (ccr.num_generations, ccr.clip_epsilon, ccr.lambda_acc, ccr.lambda_causal) == (4, 0.2, 1.0, 0.5)
    assert (ccr.steps, ccr.rollout_prompts, ccr.max_new_tokens, ccr.lr, ccr.kl_beta) == (200, 32, 1024, 1e-5, 0.0)
    assert (ccr.lora.rank, tuple(ccr.lora.targets)) == (64, ("q", "k", "v", "o"))
    assert (m.imt.lr, m.imt.epochs, m.imt.beta, m.imt.max_steps) == (1e-4, 3, 0.5, 0)
    assert m.rollout_relayout is True   # 8 x 80 GB under FSDP: gather once per rollout, not at every token


@pytest.mark.parametrize("field,value", [
    ("ccr.steps", 0), ("ccr.top_p", 0.0), ("ccr.causal_reduction", "mean"), ("ccr.open_ended_match", "bleu"),
    ("ccr.lora.rank", 0), ("ccr.warmup_ratio", 2.0), ("imt.epochs", 0), ("imt.lr", -1.0), ("imt.schedule", "step"),
    ("warmup.max_steps", -1),
    # Each of these trained silently (dropout 2) or failed with a traceback, some only after Stage I had trained.
    ("sampler.dropout", 2.0), ("sampler.num_heads", 0), ("encoder.kind", "vit"), ("encoder.feature_layer", "neck"),
    ("encoder.dtype", "int8"), ("encoder.store_dtype", "float64"), ("regions.source", "sam"),
    ("regions.threshold", 0.0), ("regions.top_k", 0), ("warmup.warmup_ratio", 1.5),
])
def test_impossible_medsynapse_values_are_config_errors_naming_the_field(field, value):
    from vital_jax.medsynapse import trainer

    c = medsynapse_demo.get_config()
    *parents, leaf = field.split(".")
    section = c.medsynapse
    for name in parents:
        section = section[name]
    section[leaf] = value
    with pytest.raises(ConfigError, match=re.escape(f"config.medsynapse.{field}")):
        trainer.validate_config(c)


def test_every_config_file_the_docs_and_launch_scripts_name_exists():
    """A launcher example naming a config that is not there fails only on the cluster; the docs are checked here."""
    import os

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    named = {}
    for folder, names in ((".", ["README.md"]), ("launch", os.listdir(os.path.join(repo, "launch"))),
                          ("benchmarks", ["README.md"])):
        for name in names:
            with open(os.path.join(repo, folder, name), encoding="utf-8") as f:
                for path in re.findall(r"\bconfigs/[\w/]+\.py\b", f.read()):
                    named.setdefault(path, f"{folder}/{name}")
    assert len(named) >= 5, named   # the pattern still finds the recipes
    missing = {path: where for path, where in named.items() if not os.path.isfile(os.path.join(repo, path))}
    assert not missing, missing


@pytest.mark.parametrize("field,value,message", [
    ("data.batch_size", 0, "data.batch_size=0"),
    ("logging.every_steps", 0, "logging.every_steps=0"),             # a ZeroDivisionError traceback at step 1
    ("checkpoint.save_every_steps", 0, "checkpoint.save_every_steps=0"),  # "saving checkpoint 1 failed" after step 1
    ("data.prompt_buckets", (), "prompt_buckets"),
    ("data.max_pixels", 100, "data.max_pixels=100"),
    ("checkpoint.atomicity", "atomic", "config.checkpoint.atomicity='atomic' must be one of"),
])
def test_impossible_run_values_of_a_medsynapse_config_are_config_errors_before_anything_runs(field, value, message):
    """The data, checkpoint and logging fields that VITAL's `train.validate_config` checks were not checked for a
    MedSynapse-V run."""
    from vital_jax.medsynapse import trainer

    c = medsynapse_demo.get_config()
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        trainer.validate_config(c)


def test_every_config_flag_the_docs_and_launch_scripts_name_is_a_config_field():
    """A `--config.<field>=` in an example that no config has is an error at the user's first try (ml_collections
    refuses unknown fields); a renamed field leaves such examples behind."""
    import glob
    import importlib
    import os

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fields = set()

    def collect(node, prefix=""):
        for key, value in node.items():
            fields.add(prefix + key)
            if isinstance(value, ml_collections.ConfigDict):
                collect(value, prefix + key + ".")

    modules = [os.path.relpath(p, repo)[:-3].replace(os.sep, ".")
               for p in glob.glob(os.path.join(repo, "configs", "**", "*.py"), recursive=True)
               if not p.endswith("__init__.py")]
    for name in modules + ["vital_jax.pretrain"]:
        module = importlib.import_module(name)
        if hasattr(module, "get_config"):
            collect(module.get_config())
    assert {"model.backbone_dir", "out_dir", "stop_after_minutes", "checkpoint.atomicity"} <= fields
    documents = [os.path.join(repo, "README.md"), os.path.join(repo, "benchmarks", "README.md"),
                 *glob.glob(os.path.join(repo, "launch", "*")), *glob.glob(os.path.join(repo, "configs", "**", "*.py"),
                                                                          recursive=True),
                 *glob.glob(os.path.join(repo, "docs", "**", "*.md"), recursive=True)]
    unknown = {}
    for path in documents:
        with open(path, encoding="utf-8") as f:
            for field in re.findall(r"--config\.([A-Za-z_][\w.]*\w)=", f.read()):
                if field != "FIELD" and field not in fields:
                    unknown.setdefault(field, os.path.relpath(path, repo))
    assert not unknown, unknown
