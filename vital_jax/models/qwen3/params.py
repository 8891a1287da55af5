"""HF <-> Flax parameter names for Qwen3 (and the shared text-decoder rules Qwen3-VL reuses)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vital_jax.models.hf_mapping import IDENTITY, LINEAR, Rule, load_hf_params
from vital_jax.models.qwen3.config import Qwen3Config


def decoder_rules(hf_prefix: str, flax_prefix: str) -> list[Rule]:
    """Rules for an embedding + decoder stack + final norm under the given prefixes.

    hf_prefix: e.g. 'model.' (Qwen3) or 'model.language_model.' (Qwen3-VL); flax_prefix: '' or 'language_model/'.
    """
    p = hf_prefix.replace(".", r"\.")
    layer = rf"{p}layers\.(?P<i>\d+)\."
    f = f"{flax_prefix}model/layers_{{i}}/"
    rules = [Rule(rf"{p}embed_tokens\.weight", f"{flax_prefix}embed_tokens/embedding", IDENTITY),
             Rule(rf"{p}norm\.weight", f"{flax_prefix}model/norm/scale", IDENTITY)]
    for proj in ("q", "k", "v", "o"):
        rules.append(Rule(rf"{layer}self_attn\.{proj}_proj\.weight", f"{f}self_attn/{proj}_proj/kernel", LINEAR))
    for norm in ("q_norm", "k_norm"):
        rules.append(Rule(rf"{layer}self_attn\.{norm}\.weight", f"{f}self_attn/{norm}/scale", IDENTITY))
    for proj in ("gate", "up", "down"):
        rules.append(Rule(rf"{layer}mlp\.{proj}_proj\.weight", f"{f}mlp/{proj}_proj/kernel", LINEAR))
    for norm in ("input_layernorm", "post_attention_layernorm"):
        rules.append(Rule(rf"{layer}{norm}\.weight", f"{f}{norm}/scale", IDENTITY))
    return rules


RULES = decoder_rules("model.", "") + [Rule(r"lm_head\.weight", "lm_head/kernel", LINEAR)]


def abstract_params(config: Qwen3Config) -> dict:
    """The Flax 'params' tree as ShapeDtypeStructs, without allocating weights."""
    from vital_jax.models.qwen3.modeling import Qwen3ForCausalLM

    model = Qwen3ForCausalLM(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), input_ids=jnp.zeros((1, 1), jnp.int32)))
    return shapes["params"]


def load_params(model_dir: str, config: Qwen3Config) -> dict:
    """Read a HF Qwen3 checkpoint directory into Flax params (numpy arrays in `config.param_dtype`)."""
    # A tied checkpoint normally has no lm_head.weight; if one is present anyway it duplicates the embedding.
    ignore = [r"lm_head\.weight"] if config.tie_word_embeddings else []
    return load_hf_params(model_dir, RULES, abstract_params(config), config.param_dtype, ignore=ignore)
