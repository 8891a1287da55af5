"""The paper's ablations (Tables 2 and 3, Appendix C.5) as variants of the 8B recipe:

    python -m vital_jax.train --config=configs/ablation.py:task_only --workdir=... [--config.model.* paths]

Variants (Table 2) task_only, semantic (+L_text), visual (+L_visual); (Table 3) k0 .. k4 (K capped at that
value; k0 is the direct-answer baseline), full_mix, two_phase, three_phase (= the default), reverse; (Appendix C.5,
Table 15) per_step: step k regresses Normalize(a_k f_ROI + (1 - a_k) f_global) instead of the shared f_ROI, which
needs the data directory's global_features.npy (`python -m vital_jax.data.roi ... --global_features`; the demo
writes it). Append `,demo` (e.g. `configs/ablation.py:task_only,demo`) to run a variant on the built-in demo
instead of the 8B recipe.

Training budgets: the paper gives no epochs for the other schedules. Here every schedule keeps the default's 20
epochs in all (full_mix 20 over every K; two_phase 10 + 10; reverse 10 / 5 / 5, the default's epochs reversed),
so, as the phases hold different numbers of records (Table 12: ~19.6K / 39.4K / 52.2K), their sample passes
differ from three_phase's: full_mix 1.28x, two_phase 1.12x, reverse 0.65x. Set `curriculum.epochs` to compare at
equal passes instead.
"""

from configs import demo, vital_qwen3vl_8b

VARIANTS = ("task_only", "semantic", "visual", "k0", "k1", "k2", "k3", "k4", "full_mix", "two_phase",
            "three_phase", "reverse", "per_step")


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
    elif name == "per_step":
        c.vital.visual_target = "interpolated"
    elif name == "reverse":
        # Hard to easy: K = 4 only, then K >= 2, then every K (the mirror image of the default schedule).
        c.curriculum.min_k, c.curriculum.max_k = (4, 2, 1), (4, 4, 4)
        c.curriculum.epochs = tuple(reversed(c.curriculum.epochs))
    return c
