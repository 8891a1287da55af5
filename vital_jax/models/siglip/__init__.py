"""SigLIP / MedSigLIP vision encoder: the frozen tower that extracts ROI-feature targets (f_ROI)."""

from vital_jax.models.siglip.config import SiglipVisionConfig
from vital_jax.models.siglip.modeling import SiglipVisionModel, SiglipVisionOutput
from vital_jax.models.siglip.params import load_siglip_vision, save_siglip_vision
from vital_jax.models.siglip.preprocessing import SiglipPreprocessor, preprocess_batch, preprocess_image

__all__ = ["SiglipPreprocessor", "SiglipVisionConfig", "SiglipVisionModel", "SiglipVisionOutput",
           "load_siglip_vision", "preprocess_batch", "preprocess_image", "save_siglip_vision"]
