"""Data-side throughput on this machine: ROI extraction (images/s) and the grain training pipeline (samples/s).

    python -m benchmarks.data_throughput [--num_images 48 --hidden 256 --layers 4 --image_size 224 --batch 8
                                          --read_threads 2 --quick]

ROI: `roi.extract_roi_features` (host view preparation + jitted, batched encoder and pooling) on a random SigLIP,
against a reference in the same run: the same views encoded by transformers' SiglipVisionModel (PyTorch eager,
same weights) one batch at a time, pooled in numpy. Pipeline: steady-state `make_train_iterator` samples/s
with grain read threads, against a plain Python loop over the same per-record transform and collation. Ratios > 1
mean the vital_jax path is faster. Compilation and iterator set-up (the first batch) are excluded.

`--quick`: tiny sizes (the CI smoke test; its rates mean nothing). Figures: the README's performance table.
"""

import argparse
import functools
import json
import os
import tempfile
import time

import jax
import numpy as np
import torch
from PIL import Image

import transformers
from benchmarks.machine import apply_host_setting, quick_sizes
from vital_jax.data import pipeline, roi
from vital_jax.data.records import Record, write_records
from vital_jax.data.images import load_image
from vital_jax.models.qwen3_vl.tiny_tokenizer import build_tiny_tokenizer

QUESTION = "Is there an abnormal bright region in the left lobe of the liver?"
STEPS = ("The liver occupies the upper left of the image.", "A bright round region sits inside it.",
         "Its margin is smooth.", "So the answer is yes.")
QUICK = dict(num_images=4, hidden=32, layers=1, image_size=56, image_side=64, batch=2)


def _write_encoder(path: str, hidden: int, layers: int, image_size: int) -> transformers.SiglipVisionModel:
    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(hidden_size=hidden, intermediate_size=4 * hidden,
                                             num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                             image_size=image_size, patch_size=14)
    model = transformers.SiglipVisionModel(config).eval()
    model.save_pretrained(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "SiglipImageProcessor",
                   "size": {"height": image_size, "width": image_size}}, f)
    return model


def _write_dataset(root: str, num_images: int, side: int) -> list[Record]:
    rng = np.random.RandomState(0)
    os.makedirs(root, exist_ok=True)
    records = []
    for i in range(num_images):
        Image.fromarray(rng.randint(0, 256, (side, side, 3), np.uint8)).save(os.path.join(root, f"img{i}.png"))
        mask = np.zeros((side, side), np.uint8)
        extent = side // 2 if i % 2 else side // 8  # alternate the full-image and tight-crop pathways
        top, left = rng.randint(0, side - extent, 2)
        mask[top:top + extent, left:left + extent] = 255
        Image.fromarray(mask).save(os.path.join(root, f"mask{i}.png"))
        k = 1 + i % 4
        records.append(Record(id=f"rec{i}", image=f"img{i}.png", mask=f"mask{i}.png", question=QUESTION,
                              answer="yes", reasoning_chain=STEPS[:k], latent_steps=k, question_type="reasoning",
                              target="liver", target_type="organ", modality="CT", source="benchmark", split="train"))
    write_records(os.path.join(root, "records.jsonl"), records)
    return records


def _rate(count, fn, repeats=3):
    best = min(_timed(fn) for _ in range(repeats))
    return count / best


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_roi(data_dir, encoder_dir, hf_model, records, batch):
    encoder, params = roi.load_roi_encoder(encoder_dir)
    cfg = roi.RoiConfig(batch_size=batch)
    images = [os.path.join(data_dir, r.image) for r in records]
    masks = [os.path.join(data_dir, r.mask) for r in records]
    roi.extract_roi_features(images[:batch], masks[:batch], encoder, params, cfg)  # compile
    ours = _rate(len(images), lambda: roi.extract_roi_features(images, masks, encoder, params, cfg))

    def reference():
        for start in range(0, len(images), batch):
            views = [roi.prepare_view(load_image(i), roi.load_mask(m), encoder, cfg)
                     for i, m in zip(images[start:start + batch], masks[start:start + batch])]
            pixels = torch.from_numpy(np.stack([v.pixels for v in views]).transpose(0, 3, 1, 2))
            with torch.no_grad():
                patches = hf_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1].numpy()
            for view, p in zip(views, patches):
                pooled = p[view.pool].mean(0)
                pooled /= np.linalg.norm(pooled)
                np.argsort(-(p @ pooled) / np.linalg.norm(p, axis=1))[:cfg.top_k]

    theirs = _rate(len(images), reference)
    return ours, theirs


def bench_pipeline(data_dir, tokenizer_dir, num_images, batch, side, read_threads):
    """Steady-state samples/s over two epochs' worth of batches (iterator set-up and the first batch excluded)."""
    cfg = pipeline.PipelineConfig(batch_size=batch, prompt_buckets=(128, 256, 512), max_answer_tokens=16,
                                  max_step_tokens=32, max_pixels=side * side, min_pixels=4096,
                                  read_threads=read_threads)
    num_batches = 2 * (num_images // batch)
    it = pipeline.make_train_iterator(data_dir, tokenizer_dir, cfg, k_max=4, process_index=0, process_count=1)
    next(it)
    grain_rate = num_batches * batch / _timed(lambda: [next(it) for _ in range(num_batches)])

    entries = [(row, r, True) for row, r in pipeline.select_records(data_dir, "train", 4)]
    source = pipeline.RecordDataSource(data_dir, entries)
    build = pipeline.ExampleBuilder(data_dir, tokenizer_dir, cfg)
    collate = functools.partial(pipeline.collate_examples, cfg=cfg, pad_id=pipeline._pad_id(tokenizer_dir))
    collate([build(source[i]) for i in range(batch)])

    def plain_loop():
        for b in range(num_batches):
            collate([build(source[(b * batch + i) % len(source)]) for i in range(batch)])

    return grain_rate, num_batches * batch / _timed(plain_loop)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--num_images", type=int, default=48)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--image_side", type=int, default=256, help="side of the synthetic source images")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--read_threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the CI smoke test")
    args = parser.parse_args()
    args = quick_sizes(args, QUICK)
    print(apply_host_setting())

    root = tempfile.mkdtemp()
    encoder_dir, data_dir, tokenizer_dir = (os.path.join(root, d) for d in ("encoder", "data", "tokenizer"))
    hf_model = _write_encoder(encoder_dir, args.hidden, args.layers, args.image_size)
    records = _write_dataset(data_dir, args.num_images, args.image_side)
    build_tiny_tokenizer(tokenizer_dir, [QUESTION, *STEPS, "yes"], vocab_size=300)

    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; SigLIP hidden {args.hidden}, "
          f"{args.layers} layers, {args.image_size} px; {args.num_images} images of {args.image_side} px")
    ours, theirs = bench_roi(data_dir, encoder_dir, hf_model, records, args.batch)
    print(f"ROI extraction   vital_jax {ours:7.1f} images/s | transformers eager reference {theirs:7.1f} images/s "
          f"| ratio {ours / theirs:.2f}x")

    # The pipeline needs ROI rows: write them with the extractor.
    roi.extract_dataset_rois(data_dir, encoder_dir, batch_size=args.batch)
    threads, single = bench_pipeline(data_dir, tokenizer_dir, args.num_images, args.batch, args.image_side,
                                     args.read_threads)
    print(f"input pipeline   grain ({args.read_threads} read threads) {threads:7.1f} samples/s | plain loop "
          f"{single:7.1f} samples/s | ratio {threads / single:.2f}x")


if __name__ == "__main__":
    main()
