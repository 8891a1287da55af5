"""A small synthetic dataset for the demo: 12 CT/MRI/ultrasound phantoms, six questions per target, answered
offline by the geometry teacher. Runs on a fresh machine with no downloads:

    python -m vital_jax.data.build --config=configs/data/demo_phantoms.py [--config.out_dir=DIR]

Every field is listed in vital_jax.data.build_config; override any with --config.FIELD=VALUE.
"""

import os
import tempfile

from vital_jax.data.build_config import default_config


def get_config():
    config = default_config()
    config.out_dir = os.path.join(tempfile.gettempdir(), "vital_jax", "demo_phantoms")
    config.source = "phantoms"
    config.seed = 0
    config.phantoms.count = 12
    config.phantoms.size = 256
    config.teacher.kind = "geometry"
    config.teacher.workers = 2
    return config
