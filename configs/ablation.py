"""The paper's ablations (Tables 2 and 3, Appendix C.5) as variants of the 8B recipe:

    python -m vital_jax.train --config=configs/ablation.py:task_only --workdir=... [--config.model.* paths]

Variants (Table 2) task_only, semantic (+L_text), visual (+L_visual); (Table 3) k0 .. k4 (K capped at that
value; k0 is the direct-answer baseline), full_mix, two_phase, three_phase (= the default), reverse.
Appendix C.5's per-step targets (`vital.visual_target="interpolated"`) also need a global image feature per
record, which the ROI step does not store yet, so that variant is not offered here. Append `,demo` (e.g. `configs/ablation.py:task_only,demo`) to run a variant on
the built-in demo instead of the 8B recipe.
"""

from configs import demo, vital_qwen3vl_8b

VARIANTS = ("task_only", "semantic", "visual", "k0", "k1", "k2", "k3", "k4", "full_mix", "two_phase",
            "three_phase", "reverse")


def get_config(arg: str = "three_phase"):
    name, _, where = arg.partition(",")
    if name not in VARIANTS:
        raise ValueError(f"unknown ablation {name!r}; choose one of {VARIANTS}")
    c = demo.get_config() if where == "demo" else vital_qwen3vl_8b.get_config()
    total_epochs = sum(c.curriculum.epochs)
    if name == "task_only":
        c.vital.lambda_text, c.vital.lambda_visual = 0.0, 0.0
    elif name == "semantic":
        c.vital.lambda_visual = 0.0
    elif name == "visual":
        c.vital.lambda_text = 0.0
    elif name.startswith("k"):
        c.vital.latent_steps_cap = int(name[1:])
    elif name == "full_mix":
        c.curriculum.max_k, c.curriculum.epochs = (4,), (total_epochs,)
    elif name == "two_phase":
        half = total_epochs // 2
        c.curriculum.max_k, c.curriculum.epochs = (2, 4), (half, total_epochs - half)
    elif name == "reverse":
        # Hard to easy: K = 4 only, then K >= 2, then every K (the mirror image of the default schedule).
        c.curriculum.min_k, c.curriculum.max_k = (4, 2, 1), (4, 4, 4)
        c.curriculum.epochs = tuple(reversed(c.curriculum.epochs))
    return c
