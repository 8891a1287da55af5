"""PhantomVQA: a VQA benchmark whose answers need the image, from phantoms with the varied layout.

    python -m vital_jax.data.build --config=configs/data/phantom_vqa.py --config.out_dir=/data/phantom_vqa

Train, val and test are drawn from disjoint phantoms (each split from its own seed; the pretraining corpus of
`vital_jax.data.phantom_corpus` uses seeds from 1000 up). In the varied layout the anatomy is mirrored at random
and lesions come and go and move, so side, size and presence answers cannot be guessed from the question.
"""

from vital_jax.data.build_config import phantom_vqa_config


def get_config():
    return phantom_vqa_config()
