"""HF <-> Flax parameter names for Qwen3 (and the shared text-decoder rules Qwen3-VL reuses)."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

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


# ------------------------------------------------------------------ layer layouts (loop vs. nn.scan)
# Checkpoints (HF conversion, converted-model dirs, exports) always hold the loop layout `layers_{i}/...`; a
# model with `scan_layers` uses `layers/...` with a leading layer axis. These convert between the two.
STACK_PATH = ("model",)  # where Qwen3ForCausalLM keeps its DecoderStack
_LAYER_KEY = re.compile(r"layers_(\d+)")


def _stack(leaves):
    if all(isinstance(x, np.ndarray) for x in leaves):
        return np.stack(leaves)  # host arrays stay on the host (8B checkpoints load through numpy)
    return jnp.stack(leaves)


def stack_layers(params: dict, stack_path: tuple[str, ...]) -> dict:
    """The loop layout -> the scan layout: `<stack_path>/layers_{i}/...` become `<stack_path>/layers/...`
    with a leading axis of size L. A tree already in the scan layout is returned unchanged."""
    stack = _get_path(params, stack_path)
    numbered = sorted((int(m.group(1)), k) for k in stack if (m := _LAYER_KEY.fullmatch(k)))
    if not numbered:
        return params
    if [i for i, _ in numbered] != list(range(len(numbered))):
        raise ValueError(f"{'/'.join(stack_path)}: layers are not numbered 0..L-1: {[k for _, k in numbered]}")
    layers = [stack[k] for _, k in numbered]
    new_stack = {k: v for k, v in stack.items() if not _LAYER_KEY.fullmatch(k)}
    new_stack["layers"] = jax.tree.map(lambda *xs: _stack(xs), *layers)
    return _set_path(params, stack_path, new_stack)


def unstack_layers(params: dict, stack_path: tuple[str, ...]) -> dict:
    """The scan layout -> the loop layout (inverse of `stack_layers`); a loop-layout tree is returned unchanged."""
    stack = _get_path(params, stack_path)
    if "layers" not in stack:
        return params
    stacked = stack["layers"]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    new_stack = {k: v for k, v in stack.items() if k != "layers"}
    for i in range(num_layers):
        new_stack[f"layers_{i}"] = jax.tree.map(lambda x: x[i], stacked)
    return _set_path(params, stack_path, new_stack)


def to_layout(params: dict, scan_layers: bool, stack_path: tuple[str, ...] = STACK_PATH) -> dict:
    """`params` in the layout a model with this `scan_layers` setting expects."""
    return stack_layers(params, stack_path) if scan_layers else unstack_layers(params, stack_path)


def loop_layout_config(config: Qwen3Config) -> Qwen3Config:
    """`config` with unrolled layers: the layout of checkpoints and converted-model directories."""
    return dataclasses.replace(config, scan_layers=False)


# ------------------------------------------------------------------ fused projections (a decoding layout)
# `Qwen3Config.fused_projections`: per layer, (module, fused name, its parts in column order).
FUSED_PROJECTIONS = (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                     ("mlp", "gate_up_proj", ("gate_proj", "up_proj")))


def fuse_projections(params: dict, stack_path: tuple[str, ...] = STACK_PATH) -> dict:
    """Each layer's q|k|v and gate|up kernels concatenated along their output (last) axis into `qkv_proj` and
    `gate_up_proj`, in the loop or the scan layout: the tree `fused_projections` models expect. The parts must be
    plain kernels (fold LoRA adapters in first: `layers.linear.merge_lora`); a fused tree is returned unchanged."""
    stack = _get_path(params, stack_path)
    new_stack = {}
    for name, layer in stack.items():
        if name != "layers" and not _LAYER_KEY.fullmatch(name):
            new_stack[name] = layer
            continue
        layer = dict(layer)
        for module, fused, parts in FUSED_PROJECTIONS:
            block = dict(layer[module])
            if fused in block:
                continue
            for part in parts:
                if set(block[part]) != {"kernel"}:
                    raise ValueError(f"{'/'.join(stack_path)}/{name}/{module}/{part} holds {sorted(block[part])}: "
                                     f"only a plain kernel can be fused (merge LoRA adapters first)")
            kernels = [block.pop(part)["kernel"] for part in parts]
            concat = np.concatenate if all(isinstance(k, np.ndarray) for k in kernels) else jnp.concatenate
            block[fused] = {"kernel": concat(kernels, axis=-1)}
            layer[module] = block
        new_stack[name] = layer
    return _set_path(params, stack_path, new_stack)


def decoding_layout(config: Qwen3Config, params: dict) -> tuple[Qwen3Config, dict]:
    """(config, params) of a Qwen3ForCausalLM without adapters in the layout to decode in: unrolled layers (a scan
    over stacked weights slices every layer's weights out of the stacks at each token) with fused q|k|v and gate|up.
    The same numbers; traceable, so a jitted program can relay out once before its token loop. (Qwen3-VL's
    backbone, which may carry LoRA adapters, has its own: `qwen3_vl.params.decoding_layout`.)"""
    params = fuse_projections(to_layout(params, False))
    return dataclasses.replace(config, scan_layers=False, fused_projections=True), params


def _get_path(tree: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        tree = tree[key]
    return tree


def _set_path(tree: dict, path: tuple[str, ...], value) -> dict:
    if not path:
        return value
    return {**tree, path[0]: _set_path(tree[path[0]], path[1:], value)}


def abstract_params(config: Qwen3Config) -> dict:
    """The Flax 'params' tree as ShapeDtypeStructs, without allocating weights."""
    from vital_jax.models.qwen3.modeling import Qwen3ForCausalLM

    model = Qwen3ForCausalLM(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), input_ids=jnp.zeros((1, 1), jnp.int32)))
    return shapes["params"]


def load_params(model_dir: str, config: Qwen3Config) -> dict:
    """Read a HF Qwen3 checkpoint directory (or one converted by `conversion.hf_to_flax`) into Flax params
    (numpy arrays in `config.param_dtype`), in the layer layout of `config.scan_layers`."""
    # A tied checkpoint normally has no lm_head.weight; if one is present anyway it duplicates the embedding.
    ignore = [r"lm_head\.weight"] if config.tie_word_embeddings else []
    loop_layout = abstract_params(loop_layout_config(config))
    params = load_hf_params(model_dir, RULES, loop_layout, config.param_dtype, ignore=ignore)
    return to_layout(params, config.scan_layers)
