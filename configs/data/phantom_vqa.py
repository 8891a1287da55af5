"""PhantomVQA: a VQA benchmark whose answers need the image, from phantoms with the varied layout.

    python -m vital_jax.data.build --config=configs/data/phantom_vqa.py --config.out_dir=/data/phantom_vqa

Train, val and test are drawn from disjoint phantoms (each split from its own seed; the pretraining corpus of
`vital_jax.data.phantom_corpus` uses seeds from 1000 up). In the varied layout the anatomy is mirrored at random
and lesions come and go and move, so side, size and presence answers cannot be guessed from the question.
"""

from vital_jax.data.build_config import default_config


def get_config():
    c = default_config()
    c.source = "phantoms"
    c.seed = 0
    c.phantoms.size = 128
    c.phantoms.layout = "varied"
    c.phantoms.split_counts = (150, 24, 48)   # phantoms per split (train, val, test)
    c.phantoms.absent_lesion_questions = True
    c.balance_closed_answers = True
    c.teacher.kind = "geometry"
    return c
