"""Qwen3-VL config: the Qwen3 text decoder with interleaved MRoPE, the vision tower, and special token ids."""

from __future__ import annotations

import dataclasses

from vital_jax.models import hf_config
from vital_jax.models.qwen3.config import Qwen3Config
from vital_jax.models.qwen3_vl.vision_config import Qwen3VLVisionConfig


VISION_ONLY_OVERRIDES = ("frame_attention", "attention_query_chunk", "attention_score_block_mib")
TEXT_ONLY_OVERRIDES = ("scan_layers", "remat_policy")


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
    """text: the decoder (Qwen3 layers); vision: the ViT; mrope_section: (T, H, W) frequency counts."""

    text: Qwen3Config
    vision: Qwen3VLVisionConfig
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self):
        if sum(self.mrope_section) != self.text.head_dim // 2:
            raise hf_config.ConfigError(f"mrope_section {list(self.mrope_section)} must sum to head_dim/2 = "
                                        f"{self.text.head_dim // 2}")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise hf_config.ConfigError(f"vision out_hidden_size {self.vision.out_hidden_size} != text hidden_size "
                                        f"{self.text.hidden_size}")

    @property
    def merge_unit(self) -> int:
        return self.vision.spatial_merge_size ** 2

    @classmethod
    @hf_config.reads_hf_fields
    def from_hf_dict(cls, cfg: dict, source: str = "config", **overrides) -> "Qwen3VLConfig":
        """Read a HF Qwen3-VL config dict. `overrides` (dtype, param_dtype, remat, attention_impl) apply to both
        towers; `scan_layers` and `remat_policy` only to the text decoder (the frozen vision tower has no backward
        pass to bound), `frame_attention`, `attention_query_chunk` and `attention_score_block_mib` only to the
        vision tower."""
        hf_config.check_model_type(cfg, ("qwen3_vl",), source)
        text_cfg = dict(cfg["text_config"])
        # transformers reads tie_word_embeddings at the top level of the composite config only (default False);
        # text_config's copy is ignored there. Falling back to it made a config that sets it in text_config alone
        # tied here, untied in transformers: the checkpoint's own lm_head.weight was dropped.
        text_cfg["tie_word_embeddings"] = cfg.get("tie_word_embeddings", False)
        if "eos_token_id" not in text_cfg and "eos_token_id" in cfg:
            text_cfg["eos_token_id"] = cfg["eos_token_id"]
        rope = text_cfg.get("rope_parameters") or text_cfg.get("rope_scaling") or {}
        text_overrides = {k: v for k, v in overrides.items() if k not in VISION_ONLY_OVERRIDES}
        text = Qwen3Config.from_hf_dict(text_cfg, f"{source}:text_config", ("qwen3_vl_text",), **text_overrides)
        vision_overrides = {k: v for k, v in overrides.items() if k not in TEXT_ONLY_OVERRIDES}
        vision = Qwen3VLVisionConfig.from_hf_dict(cfg["vision_config"], f"{source}:vision_config",
                                                  **vision_overrides)
        return cls(
            text=text, vision=vision, mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
            image_token_id=cfg.get("image_token_id", 151655), video_token_id=cfg.get("video_token_id", 151656),
            vision_start_token_id=cfg.get("vision_start_token_id", 151652),
            vision_end_token_id=cfg.get("vision_end_token_id", 151653),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str, **overrides) -> "Qwen3VLConfig":
        return cls.from_hf_dict(hf_config.read_config_json(model_dir), f"{model_dir}/config.json", **overrides)
