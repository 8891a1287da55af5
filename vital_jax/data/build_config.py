"""The fields of a dataset-build config (vital_jax.data.build) and their defaults.

Kept apart from build.py so configs/data/*.py can start from `default_config()` without importing the module
that defines the command-line flags.
"""

from __future__ import annotations

import ml_collections

from vital_jax.data import ingest, phantoms, teacher
from vital_jax.data.records import QUESTION_TYPES


def default_config() -> ml_collections.ConfigDict:
    """Every field `build` reads, with defaults; data configs start from this and override."""
    c = ml_collections.ConfigDict()
    c.out_dir = ""
    # When out_dir holds a build from other inputs (config or source files; build_inputs.json): "refuse" (stop,
    # naming what changed) or "rebuild" (move its outputs into out_dir/replaced-<UTC time>/, then build).
    c.on_change = "refuse"
    c.source = "phantoms"                       # phantoms | biomedparse | msd | dicom
    c.seed = 0
    c.question_types = list(QUESTION_TYPES)
    c.split_fractions = (0.8, 0.1, 0.1)
    # Keep closed-ended records answer-balanced per question text (vital_jax.data.balance), so that the question
    # alone does not give the answer away.
    c.balance_closed_answers = False
    # Yes/no questions may also ask whether a target is brighter than its surround (questions.make_question).
    c.contrast_questions = False
    # layout: "standard" or "varied" (phantoms.LAYOUTS). split_counts: () -> `count` phantoms of `seed`, split by
    # `split_fractions`; (train, val, test) -> that many phantoms per split, each split from its own seed
    # (split_seeds, default seed, seed + 1, seed + 2), so no phantom of one split is drawn from another's stream.
    c.phantoms = ml_collections.ConfigDict(dict(count=12, size=256, modalities=tuple(phantoms.PHANTOM_MODALITIES),
                                                normal_anatomy=True, layout="standard", split_counts=(),
                                                split_seeds=(), absent_lesion_questions=False))
    # absent_lesion_questions: also ask "Is there a <lesion> visible?" about every lesion type a phantom lacks
    # (answer no; questions.absence_question), so presence answers need the image.
    c.biomedparse = ml_collections.ConfigDict(dict(image_dir="", mask_dir="", source="biomedparse",
                                                   normal_anatomy=False))
    # target_names: dataset.json label name -> the target name questions use ({"Anterior": "anterior hippocampus"});
    # the new name also decides the target type (an organ word makes it normal anatomy, App. A.3).
    c.msd = ml_collections.ConfigDict(dict(task_dir="", min_mask_pixels=ingest.MSD_MIN_MASK_PIXELS,
                                           ct_window=ingest.CT_WINDOW, channel=0, max_cases=0, target_names={}))
    # DICOM series (root/images/CASE/) with NIfTI label volumes (root/labels/CASE.nii.gz); labels maps label
    # values to target names ({"1": "liver"}); window () = each series' own WindowCenter/WindowWidth, else the
    # modality default (ingest.iter_dicom); name "" = the root folder's name.
    c.dicom = ml_collections.ConfigDict(dict(root="", labels={}, min_mask_pixels=ingest.MSD_MIN_MASK_PIXELS,
                                             window=(), max_cases=0, name=""))
    # The API teacher's sampling (temperature; max_tokens 0 = the endpoint's default) and its budget: max_requests
    # HTTP requests per run, retries included (0 = no limit); a spent budget stops the build, and a rerun goes on
    # from the answers kept. dry_run: write the prompts of the questions still to ask (teacher_prompts.jsonl)
    # and the bounds on their requests, ask nothing, and stop there.
    c.teacher = ml_collections.ConfigDict(dict(kind="geometry", workers=2,
                                               max_regenerations=teacher.MAX_REGENERATIONS,
                                               base_url="", model="", api_key_env="OPENAI_API_KEY",
                                               timeout_s=120.0, max_retries=5, backoff_s=2.0, temperature=0.2,
                                               max_tokens=0, max_requests=0, dry_run=False))
    c.roi = ml_collections.ConfigDict(dict(enabled=False, encoder_dir="", threshold=0.2, padding=0.05,
                                           batch_size=8))
    return c


def phantom_vqa_config() -> ml_collections.ConfigDict:
    """PhantomVQA (configs/data/phantom_vqa.py returns it): phantoms of the varied layout, train / val / test from
    disjoint seeds, absent-lesion questions, closed answers balanced per question text, geometry teacher."""
    c = default_config()
    c.source = "phantoms"
    c.seed = 0
    c.phantoms.size = 128
    c.phantoms.layout = "varied"
    c.phantoms.split_counts = (150, 24, 48)   # phantoms per split (train, val, test)
    c.phantoms.absent_lesion_questions = True
    c.balance_closed_answers = True
    c.contrast_questions = True
    c.teacher.kind = "geometry"
    return c
