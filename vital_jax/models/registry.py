"""Model families known to the conversion tools, keyed by HF `model_type`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from vital_jax.models import hf_config


@dataclasses.dataclass(frozen=True)
class Family:
    """How to read one model family: config from a HF dict, abstract params, HF load and export rules."""

    name: str
    model_types: tuple[str, ...]
    config_from_hf: Callable  # (hf_dict, source, **overrides) -> config
    abstract_params: Callable  # (config) -> params tree of ShapeDtypeStructs
    load_hf: Callable  # (model_dir, config) -> params (numpy)
    export_rules: Callable | None = None  # (config) -> list[Rule] for Flax -> HF; None: not exportable


def _qwen3() -> Family:
    from vital_jax.models.qwen3 import params as p
    from vital_jax.models.qwen3.config import Qwen3Config

    return Family("qwen3", ("qwen3",), Qwen3Config.from_hf_dict, p.abstract_params, p.load_params,
                  lambda cfg: p.RULES)


def _qwen3_vl() -> Family:
    from vital_jax.models.qwen3_vl import params as p
    from vital_jax.models.qwen3_vl.config import Qwen3VLConfig

    return Family("qwen3_vl", ("qwen3_vl",), Qwen3VLConfig.from_hf_dict, p.abstract_params, p.load_params, p.rules)


def _siglip() -> Family:
    from vital_jax.models.siglip import params as p
    from vital_jax.models.siglip.config import SiglipVisionConfig

    def load(model_dir, config):
        return p.load_siglip_vision(model_dir, dtype=config.param_dtype, use_head=config.use_head)[1]

    # Only the vision tower is converted (the ROI-feature encoder); export back to HF is not offered because the
    # text tower of a full SiglipModel is not kept.
    return Family("siglip", ("siglip", "siglip_vision_model"), SiglipVisionConfig.from_hf_dict, p.abstract_params,
                  load, None)


def _sam() -> Family:
    from vital_jax.models.sam import params as p
    from vital_jax.models.sam.config import SamVisionConfig

    # Only the image encoder is converted (MedSynapse-V's anatomical features); the prompt encoder and mask decoder
    # of a full SamModel are not kept, so export back to HF is not offered.
    return Family("sam", ("sam", "sam_vision_model"), SamVisionConfig.from_hf_dict, p.abstract_params, p.load_params,
                  None)


_FACTORIES = [_qwen3, _qwen3_vl, _siglip, _sam]


def register(factory: Callable[[], Family]) -> None:
    """Add a family (a zero-argument factory, so heavy imports happen only when it is used)."""
    _FACTORIES.append(factory)


def family_for(cfg: dict, source: str) -> Family:
    model_type = cfg.get("model_type")
    known = []
    for factory in _FACTORIES:
        family = factory()
        known.extend(family.model_types)
        if model_type in family.model_types:
            return family
    raise hf_config.ConfigError(f"{source}: model_type {model_type!r} is not supported; known: {sorted(known)}")
