"""Explain a VITAL answer: the latent steps as text and as heatmaps over the image (paper §3.3, Figure 3), and
the inter-step similarity matrix (Appendix C.6, Figure 11).

    python -m vital_jax.explain --checkpoint=WORKDIR --image=PATH --question=TEXT --out=DIR [--latent_steps=4]
    python -m vital_jax.explain --checkpoint=WORKDIR --data_dir=DATASET --split=test --out=DIR   # dataset mode

Single-example mode writes `explanation.json` (answer, each z_k decoded by the re-attached text decoder, the
||z_k|| / embedding-norm ratios, the similarity matrix), `step_<k>.png` (cosine of VP(z_k) to every MedSigLIP
patch, overlaid on the image), `summary.png` (image + one heatmap per step with its decoded text) and
`step_similarity.png`, `heatmaps.npy` (the K maps drawn); with `--mask` (the image's ground truth) Figure 12's
green ground-truth panel in the summary and, per step, whether the heatmap's peak lies in the region and its mean
cosine inside and outside; and, when the run's dataset has ROI features, the visual window's retrieval (§3.3): for
each step the `--neighbours` ROI features nearest to VP(z_k) by cosine, each named by a record that has it (id,
target, image, split), from a bank of the training split's ROI features less those of the image's own records
(`neighbour_bank`: its split and size). Dataset mode writes `step_similarity.json/png` averaged over the split (Eq. 9).
With `--grounding`, dataset mode instead scores each step's heatmap against its record's mask (the pointing
game, beside chance and the record's ROI feature itself) into `grounding.json` (`grounding`).
Either mode first removes what an earlier explanation wrote into `--out` (by those names; other files stay).
Figures are matplotlib PNGs, or PDF / SVG with `--figure_format`. The heatmaps of one example share one colour
scale, in cosine units, from the lowest to the highest value over its K maps (the colour bar gives the values);
the similarity matrix's scale is fixed to the full cosine range, -1 to 1.
At `--latent_steps=0` there are no latent steps: only `explanation.json`, with the answer and empty per-step fields.
The heatmaps need the MedSigLIP encoder: `--encoder_dir`, else the run's `model.roi_encoder_dir` (the demo's own),
else the one the dataset's ROI features were extracted with (its roi_features.json), when it is still there;
without one a warning says so. An encoder of another architecture than that recorded one is refused
(`data.roi.heatmap_encoder_dir`).
"""

from __future__ import annotations

import json
import os
import re

import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from vital_jax import cli
from vital_jax.eval import figures
from vital_jax.jsonio import atomic_write

def write_heatmaps(out_dir: str, rgb: np.ndarray, maps: np.ndarray, question: str, answer: str,
                   step_texts: list[str], figure_format: str = "png", mask: np.ndarray | None = None) -> list[str]:
    """step_<k>.<fmt> for each of the K maps, then summary.<fmt> (with the ground-truth mask in green as its last
    panel when given, Figure 12), all on the same colour scale, and heatmaps.npy (K, g, g) float32, the numbers
    drawn; returns the step figures' paths."""
    value_range = figures.heatmap_range(maps)
    paths = [figures.save(figures.step_figure(rgb, maps[i], f"z{i + 1}: {step_texts[i]}", value_range),
                          os.path.join(out_dir, f"step_{i + 1}"), figure_format) for i in range(len(maps))]
    figures.save(figures.summary_figure(rgb, maps, question, answer, step_texts, value_range, mask),
                 os.path.join(out_dir, "summary"), figure_format)
    atomic_write(os.path.join(out_dir, HEATMAPS_FILE), lambda f: np.save(f, np.asarray(maps, np.float32)),
                 binary=True)
    return paths


HEATMAPS_FILE = "heatmaps.npy"
EXPLANATION_FILE = "explanation.json"
GROUNDING_FILE = "grounding.json"
_STEP_FIGURE = re.compile(r"step_\d+\.(?:" + "|".join(figures.FORMATS) + ")")


def clear_previous_explanation(out_dir: str) -> list[str]:
    """Remove what an earlier explanation wrote into `out_dir` (its JSON, heatmaps.npy and figures, by their
    names; nothing else), so a rerun with fewer steps, at K = 0 or without heatmaps leaves none of another
    image's figures beside its own. Returns the removed names."""
    if not os.path.isdir(out_dir):
        return []
    drawn = {f"{stem}.{fmt}" for stem in ("summary", "step_similarity") for fmt in figures.FORMATS}
    ours = {EXPLANATION_FILE, HEATMAPS_FILE, GROUNDING_FILE} | drawn
    removed = sorted(name for name in os.listdir(out_dir) if name in ours or _STEP_FIGURE.fullmatch(name))
    for name in removed:
        os.remove(os.path.join(out_dir, name))
    return removed


def check_mask(mask_path: str, image_path: str) -> np.ndarray:
    """The ground-truth mask (H, W) bool of `image_path`; a ValueError naming both files when it cannot be read or
    is not the image's size."""
    from vital_jax.data.images import load_image
    from vital_jax.data.roi import load_mask

    mask = load_mask(mask_path, "--mask")
    size = load_image(image_path).shape[:2]
    if mask.shape != size:
        raise ValueError(f"--mask={mask_path}: {mask.shape[1]}x{mask.shape[0]} pixels, the image {image_path} "
                         f"{size[1]}x{size[0]}; the mask must be the image's")
    return mask


def mask_on_grid(mask: np.ndarray, grid: int) -> tuple[np.ndarray, str]:
    """(cells (grid, grid) bool, rule): the heatmap cells the mask (H, W) bool is in, by `mask_agreement`'s rule
    ("half covered", or "best covered" when some piece of the mask needed its best-covered cell). ValueError for an
    empty mask."""
    from vital_jax.data.roi import area_downsample, mask_cells

    if not mask.any():
        raise ValueError("the mask is empty: no region to score the heatmaps against")
    inside, small = mask_cells(mask, lambda m: area_downsample(m.astype(np.float32), grid))
    return inside, "best covered" if small else "half covered"


def mask_agreement(maps: np.ndarray, mask: np.ndarray) -> list[dict]:
    """How each step's heatmap (K, g, g) sits on the ground-truth mask (H, W) bool, the mask read on the heatmap's
    grid (`roi.area_downsample`: the fraction of each cell inside it; a cell is inside from half): whether the
    peak cell is inside (the pointing game) and the mean cosine of the cells inside and outside (None when there
    are none). A piece of the mask smaller than half of every cell (a lesion of a few pixels, alone or beside a
    larger one) is in its best-covered cell(s) (`roi.mask_cells`, as MedSynapse-V's regions): else it could never
    be inside and the pointing game would fail on it whatever the heatmap. Each entry says which rule gave its
    cells ("mask_cells": "half covered", or "best covered" when some piece needed it). ValueError for an empty
    mask (nothing to be inside)."""
    inside, rule = mask_on_grid(mask, maps.shape[-1])
    out = []
    for heat in np.asarray(maps, np.float64):
        peak = np.unravel_index(np.argmax(heat), heat.shape)
        out.append({"peak_in_mask": bool(inside[peak]),
                    "mean_inside": float(heat[inside].mean()) if inside.any() else None,
                    "mean_outside": float(heat[~inside].mean()) if (~inside).any() else None,
                    "mask_cells": rule})
    return out


def _same_image_files(query: str, candidates: set[str]) -> set[str]:
    """The real paths among `candidates` that are `query`'s file or a byte-for-byte copy of it (the explained
    image given by another path: a copy of a training image outside the dataset). Sizes first, so only files of
    the query's size are hashed."""
    from vital_jax.jsonio import file_sha256 as digest

    query = os.path.realpath(query)
    same = {query}
    if not os.path.isfile(query):
        return same
    size, query_digest = os.path.getsize(query), None
    for path in {os.path.realpath(c) for c in candidates} - same:
        if os.path.isfile(path) and os.path.getsize(path) == size:
            query_digest = query_digest or digest(query)
            if digest(path) == query_digest:
                same.add(path)
    return same


def roi_neighbours(run, z, top_n: int, image_path: str) -> tuple[dict, list[list[dict]]] | None:
    """The visual window's retrieval (§3.3) for one example's latent states z (1, K, D) of the image `image_path`:
    per step, the `top_n` ROI features nearest to VP(z_k) by cosine, each as {"roi_row", "cosine", "record",
    "target", "image", "split"} (the first bank record using that ROI row). None when the dataset has no ROI
    features here.

    The bank is the ROI rows of the records of the run's training split (`config.data.train_split`) only, less
    the rows of records on `image_path` itself (its file, or a copy of it under another path): held-out rows
    (val, test) would let an explanation of a held-out record retrieve its own ground-truth region, or other
    annotations the model was never trained on. Returns
    ({"split", "roi_rows" in the bank, "excluded_image_rows": rows left out for being on the query's image},
    the per-step neighbours); an empty bank gives empty lists."""
    from vital_jax.data.records import RECORDS_FILE, load_roi_arrays, read_records
    from vital_jax.vital import interpret

    data_dir = run.paths.data_dir
    arrays = load_roi_arrays(data_dir) if data_dir and os.path.isdir(data_dir) else None
    if arrays is None or top_n < 1:
        return None
    split = str(run.config.data.train_split)
    all_records = [r for r in read_records(os.path.join(data_dir, RECORDS_FILE)) if r.roi_index >= 0]
    query_images = _same_image_files(image_path, {os.path.join(data_dir, r.image) for r in all_records})
    first, on_query_image = {}, set()  # first: ROI row -> the first training record using it
    for record in all_records:
        if os.path.realpath(os.path.join(data_dir, record.image)) in query_images:
            on_query_image.add(record.roi_index)
        if record.split == split:
            first.setdefault(record.roi_index, record)
    bank_rows = np.asarray(sorted(set(first) - on_query_image), np.int64)
    bank = {"split": split, "roi_rows": int(bank_rows.size), "excluded_image_rows": len(set(first) & on_query_image)}
    k = z.shape[1]
    if not bank_rows.size:
        return bank, [[] for _ in range(k)]
    projected = interpret.project_latents(run.model, run.params, jnp.asarray(z))[0]
    features = jnp.asarray(arrays["features"][bank_rows])
    scores, positions = (np.asarray(x) for x in interpret.retrieve_neighbours(projected, features, top_n))
    out = []
    for step_scores, step_positions in zip(scores, positions):
        step = []
        for score, position in zip(step_scores, step_positions):
            row = int(bank_rows[int(position)])
            record = first[row]
            step.append({"roi_row": row, "cosine": float(score), "record": record.id, "target": record.target,
                         "image": record.image, "split": record.split})
        out.append(step)
    return bank, out


def explain_example(run, image_path: str, question: str, out_dir: str, latent_steps: int | None = None,
                    encoder_dir: str | None = None, max_text_tokens: int | None = None, figure_format: str = "png",
                    max_new_tokens: int | None = None, neighbours: int = 3, mask_path: str | None = None) -> dict:
    """Answer one question and write its explanation files (figures as png, pdf or svg); returns the explanation
    dict. The answer gets `max_new_tokens` tokens (default: the run's training answer budget, as in `evaluate`,
    whose compiled single-example program it then reuses); each step's text `max_text_tokens` (default: the run's
    `data.max_step_tokens`, the length its decoder was trained to write a step in; as the training probe). A step
    text that reached the budget without its end token is listed in `step_texts_cut` (the figures wrap long texts
    to a few lines and end them with an ellipsis; explanation.json holds them whole). `neighbours`: how many ROI
    features of the run's training split to retrieve per step (`roi_neighbours`; 0: none). `mask_path`: the ground-truth
    region (a mask of the image's size): drawn as the summary's last panel (Figure 12) and compared with each
    heatmap (`mask_agreement`, in the heatmap entries). At `latent_steps=0` only the answer is explained:
    explanation.json with empty per-step fields, and no figures."""
    from vital_jax.data.images import load_image
    from vital_jax.data.records import roi_feature_layer
    from vital_jax.data.roi import heatmap_encoder_dir, load_roi_encoder
    from vital_jax.inference import shared_predictor
    from vital_jax.vital import interpret

    figures.check_format(figure_format)
    mask = check_mask(mask_path, image_path) if mask_path is not None else None
    model, params = run.model, run.params
    k = model.config.k_max if latent_steps is None else latent_steps
    if k:  # checked before the model answers: a foreign encoder is refused before anything compiles
        encoder_dir = heatmap_encoder_dir(run.paths.data_dir, encoder_dir or run.paths.encoder_dir,
                                          "--encoder_dir (or the run's config.model.roi_encoder_dir)")
    if max_new_tokens is None:
        max_new_tokens = int(run.config.data.max_answer_tokens)
    predictor = shared_predictor(run, 1, max_new_tokens)
    answers, z, _ = predictor.answer([image_path], [question], k)
    if max_text_tokens is None:
        max_text_tokens = int(run.config.data.max_step_tokens)
    clear_previous_explanation(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    # At K = 0 the answer follows the prompt directly: no latent step to decode, compare, measure or draw, so the
    # per-step fields stay empty (and there is no z_k to set the embedding norm against).
    result = {"question": question, "answer": answers[0], "latent_steps": k, "step_texts": [],
              "step_text_budget": max_text_tokens, "step_texts_cut": [], "z_norm_per_step": [],
              "embedding_norm": None, "norm_ratio_per_step": [], "step_similarity": [], "heatmaps": []}
    if not k:
        atomic_write(os.path.join(out_dir, EXPLANATION_FILE), lambda f: json.dump(result, f, indent=2))
        return result
    z = jnp.asarray(z[:, :k])
    valid = jnp.ones(z.shape[:2], bool)
    eos = predictor.sampling.eos_token_ids
    tokens, lengths = interpret.decode_latents(model, params, z, max_new_tokens=max_text_tokens, eos_token_ids=eos)
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    step_texts = [predictor.decode(tokens[0, i], lengths[0, i]) for i in range(k)]
    sims = interpret.StepSimilarity(k)
    sims.update(z, valid)
    norms = interpret.norm_ratio(model, params, z, valid)
    result.update(step_texts=step_texts,
                  step_texts_cut=[i + 1 for i in range(k)
                                  if lengths[0, i] == 0 or int(tokens[0, i, lengths[0, i] - 1]) not in eos],
                  z_norm_per_step=[float(x) for x in np.asarray(norms["z_norm_per_step"])],
                  embedding_norm=float(norms["embedding_norm"]),
                  norm_ratio_per_step=[float(x) for x in np.asarray(norms["ratio_per_step"])],
                  step_similarity=np.where(np.isnan(sims.matrix()), None, sims.matrix()).tolist())
    rgb = load_image(image_path)  # as the predictor saw it (vital_jax.data.images)
    if mask is not None and not encoder_dir:
        logging.warning("--mask: no heatmaps without an ROI encoder, so the mask is not scored (see the warning "
                        "above on how to give one)")
    if encoder_dir:
        # The encoder output the run's ROI targets were pooled from: VP(z_k) is compared in that space.
        encoder, enc_params = load_roi_encoder(encoder_dir, roi_feature_layer(run.paths.data_dir))
        maps = np.asarray(interpret.latent_heatmaps(model, params, z, encoder.image_patches(enc_params, rgb)))[0]
        paths = write_heatmaps(out_dir, rgb, maps, question, answers[0], step_texts, figure_format, mask)
        agreement = mask_agreement(maps, mask) if mask is not None else [{}] * k
        for i, path in enumerate(paths):
            result["heatmaps"].append({"step": i + 1, "figure": path, "grid": list(maps[i].shape),
                                       "peak": [int(v) for v in np.unravel_index(np.argmax(maps[i]),
                                                                                  maps[i].shape)],
                                       **agreement[i]})
    figures.save(figures.similarity_figure(sims.matrix()), os.path.join(out_dir, "step_similarity"), figure_format)
    nearest = roi_neighbours(run, z, neighbours, image_path)
    if nearest is not None:
        result["neighbour_bank"], result["neighbours"] = nearest
    atomic_write(os.path.join(out_dir, EXPLANATION_FILE), lambda f: json.dump(result, f, indent=2))
    return result


def explain_dataset(run, data_dir: str, out_dir: str, split: str = "test", limit: int | None = None,
                    batch_size: int = 4, figure_format: str = "png", latent_steps: int | None = None) -> np.ndarray:
    """Figure 11: the inter-step similarity matrix averaged over a dataset split, every record answered with
    `latent_steps` steps (default: the run's K_max, as the paper's K = 4); writes step_similarity.json and
    step_similarity.<figure_format>, in place of an earlier explanation's files (`clear_previous_explanation`)."""
    from vital_jax.data.records import RECORDS_FILE, read_records
    from vital_jax.inference import Predictor
    from vital_jax.vital import interpret

    figures.check_format(figure_format)
    recs = [r for r in read_records(os.path.join(data_dir, RECORDS_FILE)) if r.split == split][:limit]
    if not recs:
        raise ValueError(f"{data_dir}: no records in split {split!r}")
    k = run.model.config.k_max if latent_steps is None else latent_steps
    if not 1 <= k <= run.model.config.k_max:
        raise ValueError(f"latent_steps={k}: the step similarity needs 1..K_max={run.model.config.k_max} steps")
    predictor = Predictor(run, batch_size=batch_size)
    sims = interpret.StepSimilarity(k)
    for i in range(0, len(recs), batch_size):
        chunk = recs[i:i + batch_size]
        _, z, _ = predictor.answer([os.path.join(data_dir, r.image) for r in chunk], [r.question for r in chunk], k)
        z = jnp.asarray(z)[:, :k]
        sims.update(z, jnp.ones(z.shape[:2], bool))
    matrix = sims.matrix()
    # Cleared only now: an error above leaves the earlier results as they were. Without it, a folder that held a
    # single-image explanation (or this figure in another format) would mix two explanations.
    clear_previous_explanation(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    record = {"split": split, "records": len(recs), "latent_steps": k, "matrix": matrix.tolist()}
    atomic_write(os.path.join(out_dir, "step_similarity.json"), lambda f: json.dump(record, f, indent=2))
    figures.save(figures.similarity_figure(matrix, f"Latent step similarity ({split}, {len(recs)} records)"),
                 os.path.join(out_dir, "step_similarity"), figure_format)
    return matrix


def _pointing(agreements: list[tuple[str, dict]]) -> dict:
    """Pointing-game rate and mean inside-minus-outside cosine of (record id, `mask_agreement` entry) pairs, and
    each record's hit (`hits`: id -> peak inside its mask; for paired tests between runs on the same records)."""
    contrast = [a["mean_inside"] - a["mean_outside"] for _, a in agreements
                if a["mean_inside"] is not None and a["mean_outside"] is not None]
    return {"pointing": float(np.mean([a["peak_in_mask"] for _, a in agreements])),
            "contrast": float(np.mean(contrast)) if contrast else None, "count": len(agreements),
            "hits": {record_id: bool(a["peak_in_mask"]) for record_id, a in agreements}}


def grounding(run, data_dir: str, split: str = "test", limit: int | None = None, batch_size: int = 4,
              latent_steps: int | None = None, encoder_dir: str | None = None) -> dict:
    """Does the visual window point at the question's target? Over a split's records, each answered with
    `latent_steps` steps (default K_max), each step's heatmap cos(VP(z_k), patches) against the record's own mask
    (`mask_agreement`): the pointing-game rate (peak cell inside the mask) and the mean inside-minus-outside
    cosine, per step k over the records that training ran with at least k steps (L_visual pulled their VP(z_k)
    towards the record's ROI feature; a step's state does not depend on the steps after it, so answering with
    more steps changes none of them). Beside them, in the same run: `chance`, the rate of a peak cell drawn at
    random (the mean share of the grid inside the masks of step 1's records), and `roi_feature`, the same scores
    of each record's ROI feature itself (the L_visual target, App. A.5; records without one are left out), what
    a projector that reproduced its targets exactly would score. Each step's entry (and `roi_feature`) also
    holds `hits`, record id -> peak inside its mask, for paired tests between runs on the same records."""
    from vital_jax.data.images import load_image
    from vital_jax.data.records import RECORDS_FILE, load_roi_arrays, read_records, roi_feature_layer
    from vital_jax.data.roi import heatmap_encoder_dir, load_mask, load_roi_encoder
    from vital_jax.inference import Predictor
    from vital_jax.vital import interpret
    from vital_jax.vital.batch import trained_latent_steps

    recs = [r for r in read_records(os.path.join(data_dir, RECORDS_FILE)) if r.split == split][:limit]
    if not recs:
        raise ValueError(f"{data_dir}: no records in split {split!r}")
    k_max, cap = run.model.config.k_max, run.model.config.latent_steps_cap
    if cap == 0:
        raise ValueError("this run trained no latent step (vital.latent_steps_cap = 0): no heatmap to score")
    latent_steps = k_max if latent_steps is None else latent_steps
    if not 1 <= latent_steps <= k_max:
        raise ValueError(f"latent_steps={latent_steps}: grounding scores latent steps, give 1..K_max={k_max}")
    encoder_dir = heatmap_encoder_dir(data_dir, encoder_dir or run.paths.encoder_dir, "--encoder_dir")
    if not encoder_dir:
        raise ValueError(f"grounding needs the ROI encoder the heatmaps are drawn with: give --encoder_dir "
                         f"(the one {data_dir}'s ROI features came from)")
    encoder, enc_params = load_roi_encoder(encoder_dir, roi_feature_layer(data_dir))
    roi = load_roi_arrays(data_dir)
    predictor = Predictor(run, batch_size=batch_size)
    # image -> (g*g, dv) for the last few images: a dataset lists the questions of one image together.
    patches: dict[str, np.ndarray] = {}
    steps = [[] for _ in range(latent_steps)]
    targets, inside_share = [], []
    for start in range(0, len(recs), batch_size):
        chunk = recs[start:start + batch_size]
        images = [os.path.join(data_dir, r.image) for r in chunk]
        _, z, _ = predictor.answer(images, [r.question for r in chunk], latent_steps)
        for path in images:
            if path not in patches:
                patches[path] = np.asarray(encoder.image_patches(enc_params, load_image(path)))[0]
        features = jnp.asarray(np.stack([patches[path] for path in images]))
        while len(patches) > 2 * batch_size:
            del patches[next(iter(patches))]
        maps = np.asarray(interpret.latent_heatmaps(run.model, run.params, jnp.asarray(z)[:, :latent_steps],
                                                    features))
        for i, record in enumerate(chunk):
            trained = trained_latent_steps(record.latent_steps, k_max, cap)  # >= 1: cap 0 was refused
            mask = load_mask(os.path.join(data_dir, record.mask), f"record {record.id!r}'s mask")
            for step, entry in enumerate(mask_agreement(maps[i], mask)[:trained]):
                steps[step].append((record.id, entry))
            inside, _ = mask_on_grid(mask, maps.shape[-1])
            inside_share.append(float(inside.mean()))
            if roi is not None and record.roi_index >= 0:
                target = jnp.asarray(np.asarray(roi["features"][record.roi_index], np.float32)[None, None])
                targets.append((record.id, mask_agreement(
                    np.asarray(interpret.patch_heatmaps(target, features[i:i + 1]))[0], mask)[0]))
    return {"split": split, "records": len(recs), "latent_steps": latent_steps, "grid": int(maps.shape[-1]),
            "encoder_dir": encoder_dir, "chance": float(np.mean(inside_share)),
            "steps": [{"step": i + 1, **_pointing(entries)} for i, entries in enumerate(steps) if entries],
            "roi_feature": _pointing(targets) if targets else None}


def describe_grounding(scores: dict) -> str:
    """`grounding`'s scores as the lines the command prints."""
    lines = [f"{scores['records']} {scores['split']} records, {scores['grid']}x{scores['grid']} heatmaps; pointing "
             f"game (peak cell inside the record's mask), chance {100 * scores['chance']:.1f} %"]
    rows = [(f"z{s['step']}", s) for s in scores["steps"]]
    if scores["roi_feature"] is not None:
        rows.append(("ROI feature (the L_visual target)", scores["roi_feature"]))
    for name, s in rows:
        contrast = "–" if s["contrast"] is None else f"{s['contrast']:+.3f}"
        lines.append(f"  {name:<34} {100 * s['pointing']:5.1f} % of {s['count']}, inside - outside cosine {contrast}")
    return "\n".join(lines)


def main(argv):
    from vital_jax.checkpoint import CheckpointError
    from vital_jax.models.hf_config import ConfigError
    from vital_jax.run import load_run, read_config

    cli.no_positional(argv)
    cli.require(checkpoint=_CHECKPOINT.value, out=_OUT.value)
    cli.require_directories(out=_OUT.value)
    dataset = bool(_DATA_DIR.value)
    if not dataset and (not _IMAGE.value or _QUESTION.value is None):
        cli.usage("give --image and --question (or --data_dir for dataset mode)")
    if not dataset and not _QUESTION.value.strip():
        cli.usage("--question is empty")
    if dataset and _MASK.value:
        cli.usage("--mask is for single-example mode (the image's ground truth); dataset mode takes none")
    if _GROUNDING.value and not dataset:
        cli.usage("--grounding scores a dataset's records against their masks: give --data_dir")
    for flag, path in (("data_dir", _DATA_DIR.value), ("image", _IMAGE.value), ("encoder_dir", _ENCODER_DIR.value),
                       ("mask", _MASK.value)):
        if path and not os.path.exists(path):
            cli.usage(f"--{flag}={path}: no such file or directory")
    cli.quiet_libraries()
    cli.tune_host_memory()
    try:
        k_max = int(read_config(_CHECKPOINT.value).vital.k_max)  # the recorded config: no model loaded yet
        k = _LATENT_STEPS.value
        if k is not None and not 0 <= k <= k_max:
            cli.usage(f"--latent_steps={k} is outside 0..K_max={k_max} of this run")
        if dataset and k == 0:
            cli.usage("--latent_steps=0: dataset mode averages the similarity of latent steps, give K >= 1")
        if dataset:
            from vital_jax.data.records import RECORDS_FILE, read_records

            if not any(r.split == _SPLIT.value for r in read_records(os.path.join(_DATA_DIR.value, RECORDS_FILE))):
                cli.usage(f"--split={_SPLIT.value}: {_DATA_DIR.value} has no records in that split")
        if _MASK.value and k == 0:
            cli.usage("--mask scores the latent steps' heatmaps: --latent_steps=0 has none")
        if _IMAGE.value:  # decodable, before the model loads (load_image's checks)
            from vital_jax.data.images import check_file

            check_file(_IMAGE.value, decode=True)
        if _MASK.value:  # readable and of the image's size, before the model loads
            check_mask(_MASK.value, _IMAGE.value)
        cli.status(f"loading the run in {_CHECKPOINT.value}...")
        run = load_run(_CHECKPOINT.value)
        if dataset and _GROUNDING.value:
            cli.status(f"answering the {_SPLIT.value} split at K={k_max if k is None else k} and scoring each "
                       "step's heatmap against its record's mask...")
            scores = grounding(run, _DATA_DIR.value, _SPLIT.value, _LIMIT.value, latent_steps=k,
                               encoder_dir=_ENCODER_DIR.value)
            clear_previous_explanation(_OUT.value)
            os.makedirs(_OUT.value, exist_ok=True)
            atomic_write(os.path.join(_OUT.value, GROUNDING_FILE), lambda f: json.dump(scores, f, indent=2))
            print(describe_grounding(scores))
            print(f"written to {os.path.join(_OUT.value, GROUNDING_FILE)}")
            return 0
        if dataset:
            cli.status(f"answering the {_SPLIT.value} split at K={k_max if k is None else k} and averaging the "
                       "step similarity...")
            matrix = explain_dataset(run, _DATA_DIR.value, _OUT.value, _SPLIT.value, _LIMIT.value,
                                     figure_format=_FIGURE_FORMAT.value, latent_steps=k)
            print(f"averaged step similarity ({matrix.shape[0]}x{matrix.shape[0]}) written to {_OUT.value}")
            return 0
        cli.status("answering, decoding the latent steps and drawing their heatmaps (compiling first)...")
        result = explain_example(run, _IMAGE.value, _QUESTION.value, _OUT.value, k, _ENCODER_DIR.value,
                                 figure_format=_FIGURE_FORMAT.value, neighbours=_NEIGHBOURS.value,
                                 mask_path=_MASK.value)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as e:
        cli.fail(e)
    print(f"answer: {result['answer']}")
    for i, text in enumerate(result["step_texts"], start=1):
        print(f"  z{i}: {text}")
        if result.get("neighbours") and result["neighbours"][i - 1]:
            near = result["neighbours"][i - 1][0]
            print(f"      nearest ROI: {near.get('target', '?')} (record {near.get('record', '?')}, "
                  f"cosine {near['cosine']:.3f})")
    print(f"explanation written to {os.path.abspath(_OUT.value)}")
    return 0


def _define_flags():
    """Flags exist only when this module runs as a program (importing it defines none)."""
    global _CHECKPOINT, _IMAGE, _QUESTION, _DATA_DIR, _SPLIT, _LIMIT, _LATENT_STEPS, _ENCODER_DIR, _OUT
    global _FIGURE_FORMAT, _NEIGHBOURS, _MASK, _GROUNDING
    _CHECKPOINT = flags.DEFINE_string("checkpoint", None, "a training workdir")
    _IMAGE = flags.DEFINE_string("image", None, "image file (single-example mode)")
    _QUESTION = flags.DEFINE_string("question", None, "question (single-example mode)")
    _DATA_DIR = flags.DEFINE_string("data_dir", None, "a vital_jax dataset directory (dataset mode)")
    _SPLIT = flags.DEFINE_string("split", "test", "dataset split (dataset mode)")
    _LIMIT = flags.DEFINE_integer("limit", None, "dataset mode: at most N records", lower_bound=1)
    _LATENT_STEPS = flags.DEFINE_integer("latent_steps", None, "K (default: the run's K_max)")
    _ENCODER_DIR = flags.DEFINE_string("encoder_dir", None, "MedSigLIP directory for the heatmaps")
    _OUT = flags.DEFINE_string("out", None, "output directory")
    _FIGURE_FORMAT = flags.DEFINE_enum("figure_format", "png", list(figures.FORMATS), "format of the figures")
    _MASK = flags.DEFINE_string("mask", None, "single-example mode: the ground-truth mask of the image (Figure 12: "
                                "drawn beside the heatmaps and compared with each)")
    _GROUNDING = flags.DEFINE_bool("grounding", False, "dataset mode: score each latent step's heatmap against its "
                                   "record's mask (pointing game, beside chance and the ROI feature itself) into "
                                   "grounding.json, instead of the step similarity")
    _NEIGHBOURS = flags.DEFINE_integer("neighbours", 3, "single-example mode: ROI features of the run's dataset "
                                       "retrieved per step by cosine to VP(z_k) (0: none)", lower_bound=0)


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
