"""SAM (Segment Anything v1) ViT image encoder, the architecture of MedSAM: a frozen spatial feature extractor."""

from vital_jax.models.sam.config import SamVisionConfig
from vital_jax.models.sam.modeling import SamVisionEncoder, SamVisionOutput
from vital_jax.models.sam.params import load_sam_vision
from vital_jax.models.sam.preprocessing import SamPreprocessor

__all__ = ["SamPreprocessor", "SamVisionConfig", "SamVisionEncoder", "SamVisionOutput", "load_sam_vision"]
