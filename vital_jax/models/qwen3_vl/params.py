"""HF <-> Flax parameter names for Qwen3VLForConditionalGeneration (vision rules + shared decoder rules)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vital_jax.layers.linear import LoraConfig, merge_lora
from vital_jax.models.hf_mapping import LINEAR, Rule, load_hf_params
from vital_jax.models.qwen3 import params as qwen3_params
from vital_jax.models.qwen3.modeling import FUSED_TARGETS
from vital_jax.models.qwen3.params import decoder_rules
from vital_jax.models.qwen3_vl import vision_params
from vital_jax.models.qwen3_vl.config import Qwen3VLConfig


def rules(config: Qwen3VLConfig) -> list[Rule]:
    return (vision_params.rules_for(config.vision)
            + decoder_rules("model.language_model.", "language_model/")
            + [Rule(r"lm_head\.weight", "lm_head/kernel", LINEAR)])


def abstract_params(config: Qwen3VLConfig, lora: LoraConfig | None = None) -> dict:
    """The Flax 'params' tree as ShapeDtypeStructs (no weights allocated); with `lora`, including adapters."""
    from vital_jax.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration(config, lora)
    vis = config.vision
    grid = ((1, vis.spatial_merge_size, vis.spatial_merge_size),)

    def init():
        variables = model.init(jax.random.PRNGKey(0), input_ids=jnp.zeros((1, 1), jnp.int32))
        visual = model.init(jax.random.PRNGKey(0), jnp.zeros((vis.merge_unit, vis.patch_dim)), grid,
                            method=model.encode_images)
        return {**variables["params"], "visual": visual["params"]["visual"]}

    return jax.eval_shape(init)


STACK_PATH = ("language_model", "model")  # where the text DecoderStack lives


def to_layout(params: dict, scan_layers: bool) -> dict:
    """`params` in the text-decoder layer layout of `scan_layers` (see `qwen3.params.stack_layers`)."""
    return qwen3_params.to_layout(params, scan_layers, STACK_PATH)


def loop_layout_config(config: Qwen3VLConfig) -> Qwen3VLConfig:
    """`config` with unrolled text layers: the layout of checkpoints and converted-model directories."""
    return dataclasses.replace(config, text=dataclasses.replace(config.text, scan_layers=False))


def decoding_layout(config: Qwen3VLConfig, params: dict, lora: LoraConfig | None = None
                    ) -> tuple[Qwen3VLConfig, dict, LoraConfig | None]:
    """(config, params, lora) in the layout to decode in: the same numbers, fewer and larger weight reads.

    1. Unrolled text layers. Under `scan_layers` each decode step slices every layer's weights out of the stacked
       arrays, and XLA materialises the slices (one `dynamic-slice` per weight and layer in the while loop's body),
       so every answer token copies the whole text decoder before it reads it. Unrolled, each layer reads its own
       arrays: on CPU (hidden 1024 x 8 layers, float32) 14.2 instead of 26.8 ms per token. Training keeps the
       scan (it bounds remat's memory).
    2. With float32 weights, LoRA adapters folded into their kernels (`merge_lora`; returned lora None): a step
       then reads each projection once instead of kernel + A + B (at rank 64 and hidden 512 the adapters are a
       quarter of the kernel's bytes). Each merged weight differs from W + (alpha / r) A B by float32 rounding
       only. Weights stored in another dtype keep their adapters: bf16's 8 mantissa bits would round small
       deltas away (issue #18), so the merge would change the model.
    3. Then, without adapters on them, the text layers' q|k|v and gate|up kernels fused
       (`Qwen3Config.fused_projections`): two matrix-vector products per layer instead of five, measured 1.8 %
       of the K = 4 inference program on the 2-core CPU (benchmarks/README.md).
    New arrays are made: while the caller keeps `params`, both are held.
    """
    if config.text.scan_layers:
        config, params = loop_layout_config(config), to_layout(params, False)
    if lora is not None and jnp.dtype(config.text.param_dtype) == jnp.float32:
        params, lora = merge_lora(params, lora), None
    if lora is None or not set(lora.targets) & set(FUSED_TARGETS):
        params = qwen3_params.fuse_projections(params, STACK_PATH)
        config = dataclasses.replace(config, text=dataclasses.replace(config.text, fused_projections=True))
    return config, params, lora


def load_params(model_dir: str, config: Qwen3VLConfig) -> dict:
    """Read a HF Qwen3-VL checkpoint directory (or one converted by `conversion.hf_to_flax`) into Flax params
    (numpy, `param_dtype`), in the text-decoder layer layout of `config.text.scan_layers`."""
    ignore = [r"lm_head\.weight"] if config.text.tie_word_embeddings else []
    params = load_hf_params(model_dir, rules(config), abstract_params(loop_layout_config(config)),
                            config.text.param_dtype, ignore=ignore)
    return to_layout(params, config.text.scan_layers)
