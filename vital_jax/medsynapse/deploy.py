"""Inference without the encoder (§2.4, last paragraph): the deployed MedSynapse-V model is the backbone (with
Stage II's LoRA, merged or not) plus A_psi. E_ana and P_phi are neither in its parameters nor in its program.

    params = deploy.deployable_params(stage3_params, lora)        # {"backbone", "autonomous"}
    tokens, lengths = deploy.make_generate(backbone, autonomous, sampling)(params, prefix, rng)

Generation runs the vision tower once: its merged visual tokens feed A_psi (M_auto, N x D) and the prefill; the
memory block is then written after the prompt and the answer decoded, through `memory.generate`, the same path
as Stage I-III training. The HF export of these parts is `conversion/medsynapse_export.py`, and a PyTorch
reference of this generation is `conversion/torch_medsynapse_generate.py`.
"""

from __future__ import annotations

import jax

from vital_jax import generation
from vital_jax.layers.linear import LoraConfig, merge_lora
from vital_jax.medsynapse import autonomous as autonomous_lib
from vital_jax.medsynapse import memory as memory_lib
from vital_jax.medsynapse.autonomous import AutonomousMemory
from vital_jax.models.qwen3_vl.cached import PrefixInputs
from vital_jax.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration

DEPLOYED = ("backbone", "autonomous")


def deployable_params(params: dict, lora: LoraConfig | None = None) -> dict:
    """The deployed tree {"backbone", "autonomous"} out of a training tree (P_phi under "sampler", and anything
    else, e.g. an encoder, is left behind). With `lora`, the adapters are folded into the backbone's kernels
    (the tree then has exactly the base model's leaves), in the kernels' own dtype: a bf16 backbone loses the
    update's entries below half an ulp of W (`merge_lora`), so keep its adapters (no `lora`, as
    `qwen3_vl_params.decoding_layout` does); without, they stay and the backbone module must be built with the
    same LoraConfig."""
    missing = [k for k in DEPLOYED if k not in params]
    if missing:
        raise ValueError(f"a deployable model needs {list(DEPLOYED)}; missing {missing}")
    backbone = merge_lora(params["backbone"], lora) if lora is not None else params["backbone"]
    return {"backbone": backbone, "autonomous": params["autonomous"]}


def generate(backbone: Qwen3VLForConditionalGeneration, autonomous: AutonomousMemory, params: dict,
             prefix: PrefixInputs, sampling: generation.SamplingConfig, rng=None,
             prompt_tail: int = 0) -> tuple[jax.Array, jax.Array]:
    """Answers for a batch of prompts with M_auto injected (where: `memory.inject`'s prompt_tail). params: exactly
    {"backbone", "autonomous"} (a tree that still holds P_phi or an encoder is refused, so a deployment cannot
    silently carry them).
    Returns (tokens (B, max_new_tokens) int32, lengths (B,) int32)."""
    if set(params) != set(DEPLOYED):
        raise ValueError(f"deployed params are exactly {list(DEPLOYED)}, got {sorted(params)}; "
                         "use deployable_params")
    prefix, memory = autonomous_lib.autonomous_memory(backbone, autonomous, params, prefix)
    return memory_lib.generate(backbone, params["backbone"], prefix, memory, sampling, rng, prompt_tail)


def make_generate(backbone: Qwen3VLForConditionalGeneration, autonomous: AutonomousMemory,
                  sampling: generation.SamplingConfig, prompt_tail: int = 0):
    """`generate` jitted over (params, prefix, rng=None)."""

    @jax.jit
    def run(params, prefix, rng=None):
        return generate(backbone, autonomous, params, prefix, sampling, rng, prompt_tail)

    return run
