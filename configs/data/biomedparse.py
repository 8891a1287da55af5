"""A BiomedParse-layout folder pair -> a vital_jax dataset, answered offline by the geometry teacher.

    python -m vital_jax.data.build --config=configs/data/biomedparse.py --config.out_dir=/data/vital_bp \
        --config.biomedparse.image_dir=/data/BiomedParse/train \
        --config.biomedparse.mask_dir=/data/BiomedParse/train_mask

Images are `NAME_MODALITY_SITE.png` and masks `NAME_MODALITY_SITE_TARGET.png` (0/255; '+' stands for a space in
the target name), as in BiomedParse's release (vital_jax.data.ingest); modality and site come from the names.
Splits are drawn by image (`split_fractions`). Every field is listed in vital_jax.data.build_config; override any
with --config.FIELD=VALUE.
"""

from vital_jax.data.build_config import default_config


def get_config():
    c = default_config()
    c.source = "biomedparse"
    c.out_dir = ""                      # required: where the dataset goes
    c.biomedparse.image_dir = ""        # required: the image folder
    c.biomedparse.mask_dir = ""         # required: the mask folder
    c.biomedparse.source = "biomedparse"  # the records' source (evaluation groups its rows by it)
    c.split_fractions = (0.8, 0.1, 0.1)
    c.balance_closed_answers = True     # the question alone does not give a closed answer away
    c.teacher.kind = "geometry"         # offline; "api" for an OpenAI-compatible endpoint (README)
    return c
