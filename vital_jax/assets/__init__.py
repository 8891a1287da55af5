"""Files that ship with vital_jax: the small pretrained phantom VLM the demo (and the quick study) start from.

`phantom_vlm/backbone_hf` (Qwen3-VL) and `phantom_vlm/decoder_hf` (Qwen3) are HF checkpoint directories made by
`python -m vital_jax.pretrain --config=configs/study/pretrain_phantom.py`; `phantom_vlm/PROVENANCE.json` records
the command, the commit and the pretraining summary (losses, throughput).
"""

from __future__ import annotations

import json
import os

PHANTOM_VLM_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "phantom_vlm")


def phantom_vlm() -> dict[str, str]:
    """{"backbone_dir", "decoder_dir"} of the shipped pair; a clear error when the files are missing."""
    out = {"backbone_dir": os.path.join(PHANTOM_VLM_DIR, "backbone_hf"),
           "decoder_dir": os.path.join(PHANTOM_VLM_DIR, "decoder_hf")}
    missing = [d for d in out.values() if not os.path.exists(os.path.join(d, "model.safetensors"))]
    if missing:
        raise FileNotFoundError(f"the shipped pretrained models are missing ({', '.join(missing)}); reinstall "
                                f"vital_jax or pretrain a pair with `python -m vital_jax.pretrain`")
    return out


def phantom_vlm_provenance() -> dict:
    """PROVENANCE.json of the shipped pair: {"command", "commit", "note", "summary"}."""
    with open(os.path.join(PHANTOM_VLM_DIR, "PROVENANCE.json")) as f:
        return json.load(f)
