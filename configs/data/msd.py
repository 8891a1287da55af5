"""A Medical Segmentation Decathlon task -> a vital_jax dataset of axial slices, answered offline.

    python -m vital_jax.data.build --config=configs/data/msd.py --config.out_dir=/data/vital_liver \
        --config.msd.task_dir=/data/MSD/Task03_Liver

The task folder holds `dataset.json`, `imagesTr/` and `labelsTr/` (NIfTI, .nii or .nii.gz) as the Decathlon
ships them. Volumes are brought to RAS+ and sliced axially; a slice is kept when one of its labels covers at least
`msd.min_mask_pixels` pixels; CT slices go through the `msd.ct_window` (level, width) in HU, MR volumes are
percentile-normalised (vital_jax.data.ingest.iter_msd). Every field is listed in vital_jax.data.build_config.
"""

from vital_jax.data.build_config import default_config


def get_config():
    c = default_config()
    c.source = "msd"
    c.out_dir = ""                      # required: where the dataset goes
    c.msd.task_dir = ""                 # required: e.g. /data/MSD/Task03_Liver
    c.msd.max_cases = 0                 # 0 = every training case; a small number for a first try
    c.msd.target_names = {}             # dataset.json label name -> target name: {"Anterior": "anterior hippocampus"}
    c.split_fractions = (0.8, 0.1, 0.1)
    c.balance_closed_answers = True
    c.teacher.kind = "geometry"
    return c
