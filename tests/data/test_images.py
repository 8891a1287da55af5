"""One image loader and one set of checks at every stage (build, validate, training, evaluation), and the window
of 16-bit images they all share (vital_jax.data.images)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from vital_jax.data import build, images, pipeline, records
from vital_jax.data.build_config import default_config
from vital_jax.data.ingest import IngestError
from vital_jax.eval.benchmarks import BenchmarkError, load_benchmark
from vital_jax.models.qwen3_vl import preprocessing
from vital_jax.models.qwen3_vl.tiny_tokenizer import build_tiny_tokenizer

QUESTION = "Where is the liver located in this CT scan?"
ANSWER = "The liver is located in the upper left part of the image."


def _biomedparse_config(tmp_path, image: Image.Image, mask_value=255):
    """A BiomedParse-layout source of one image (`a_CT_liver.png`) whose liver mask covers its centre."""
    image_dir, mask_dir = tmp_path / "src", tmp_path / "src_mask"
    os.makedirs(image_dir)
    os.makedirs(mask_dir)
    image.save(image_dir / "a_CT_liver.png")
    mask = np.zeros((image.height, image.width), np.uint8)
    mask[image.height // 4:max(image.height // 2, 1), image.width // 4:max(image.width // 2, 1)] = mask_value
    Image.fromarray(mask).save(mask_dir / "a_CT_liver_liver.png")
    config = default_config()
    config.out_dir, config.source = str(tmp_path / "out"), "biomedparse"
    config.biomedparse.image_dir, config.biomedparse.mask_dir = str(image_dir), str(mask_dir)
    return config


def _dataset_of(root, image: Image.Image) -> records.Record:
    """A one-record dataset directory whose image is `image`."""
    os.makedirs(root / "images")
    os.makedirs(root / "masks")
    image.save(root / "images/tiny.png")
    Image.fromarray(np.full((image.height, image.width), 255, np.uint8)).save(root / "masks/tiny_liver.png")
    record = records.Record(id="r0", image="images/tiny.png", mask="masks/tiny_liver.png", question=QUESTION,
                            answer=ANSWER, reasoning_chain=("It lies upper left.", "So upper left."), latent_steps=2,
                            question_type="location", target="liver", target_type="organ", modality="CT",
                            source="test", split="test")
    records.write_records(str(root / records.RECORDS_FILE), [record])
    return record


def test_image_limits_are_those_of_the_backbone_resize():
    assert images.MIN_SIDE == preprocessing.MIN_SIDE
    assert images.MAX_ASPECT_RATIO == preprocessing.MAX_ASPECT_RATIO


def test_a_too_small_image_is_refused_at_build_validate_training_and_evaluation_naming_the_file(tmp_path):
    tiny = Image.new("RGB", (1, 1), (90, 90, 90))
    too_small = r"image of 1x1 pixels is too small"
    # Build: the source file.
    with pytest.raises(IngestError, match=r"a_CT_liver\.png: " + too_small):
        build.build(_biomedparse_config(tmp_path / "b", tiny))
    # validate: a dataset directory made some other way.
    data_dir = tmp_path / "data"
    record = _dataset_of(data_dir, tiny)
    problems = records.validate_dataset(str(data_dir))
    assert any("record 'r0'" in p and "tiny.png: " + "image of 1x1 pixels is too small" in p for p in problems), \
        problems
    # Training: the example builder names the record and the file.
    tokenizer_dir = str(tmp_path / "tokenizer")
    build_tiny_tokenizer(tokenizer_dir, [QUESTION, ANSWER, *record.reasoning_chain], vocab_size=300)
    builder = pipeline.ExampleBuilder(str(data_dir), tokenizer_dir, pipeline.PipelineConfig(
        batch_size=1, min_pixels=1024, max_pixels=64 * 64))
    with pytest.raises(pipeline.PipelineError, match=r"record 'r0'.*tiny\.png: " + too_small):
        builder({"record": record, "record_index": 0, "roi_feature": np.zeros(4, np.float32), "example_valid": True})
    # Evaluation: the benchmark loader stops before the model loads, and the predictor names the file too.
    with open(data_dir / "test.jsonl", "w") as f:
        f.write(json.dumps({"id": "q1", "image": "images/tiny.png", "question": "Is it?", "answer": "yes",
                            "answer_type": "closed"}) + "\n")
    with pytest.raises(BenchmarkError, match=r"test.jsonl:1 \(id 'q1'\): .*tiny\.png: " + too_small):
        load_benchmark("jsonl", str(data_dir))
    from vital_jax.inference import Predictor

    predictor = Predictor.__new__(Predictor)  # encode's image step needs no model
    predictor.batch_size, predictor.min_pixels, predictor.max_pixels, predictor.blind_images = 1, 1024, 4096, False
    with pytest.raises(images.ImageError, match=r"tiny\.png: " + too_small):
        predictor.encode([str(data_dir / "images/tiny.png")], [QUESTION])


def _twelve_bit_image(height=64, width=48) -> np.ndarray:
    """uint16 (H, W) with 12-bit values (what 16-bit medical PNGs mostly hold), a zero border and two outliers."""
    rng = np.random.default_rng(0)
    values = np.zeros((height, width), np.uint16)
    values[4:-4, 4:-4] = rng.integers(200, 4096, (height - 8, width - 8))
    values[10, 10], values[20, 20] = 65535, 1  # a hot and a cold pixel: the percentile window ignores them
    return values


def test_16bit_images_are_windowed_alike_at_build_training_and_inference(tmp_path):
    values = _twelve_bit_image()
    source = Image.fromarray(values)
    assert source.mode == "I;16"
    nonzero = values[values != 0].astype(np.float64)
    lo, hi = np.percentile(nonzero, [0.5, 99.5])
    expected = np.round(np.clip((values - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    source_path = tmp_path / "gray16.png"
    source.save(source_path)
    loaded = images.load_image(str(source_path))
    np.testing.assert_array_equal(loaded, np.repeat(expected[:, :, None], 3, axis=2))
    # The builder accepts it and writes exactly those pixels, which training then reads back unchanged.
    config = _biomedparse_config(tmp_path, source)
    build.build(config)
    built = os.path.join(config.out_dir, "images/a_CT_liver.png")
    np.testing.assert_array_equal(np.asarray(Image.open(built)), loaded)
    np.testing.assert_array_equal(images.load_image(built), loaded)
    # Inference and explain (through images.load_image) see the source file as the model was trained on it.
    ours, grid = preprocessing.preprocess_image(images.load_image(str(source_path)), min_pixels=1024,
                                                max_pixels=64 * 64)
    trained, trained_grid = preprocessing.preprocess_image(images.load_image(built), min_pixels=1024,
                                                           max_pixels=64 * 64)
    np.testing.assert_array_equal(ours, trained)
    np.testing.assert_array_equal(grid, trained_grid)
    # Float images have no defined range: refused, naming the file, wherever they are read.
    float_path = tmp_path / "float.tiff"
    Image.fromarray(values.astype(np.float32)).save(float_path)
    with pytest.raises(images.ImageError, match=r"float\.tiff: image mode 'F'"):
        images.load_image(str(float_path))
    with pytest.raises(images.ImageError, match=r"float\.tiff: image mode 'F'"):
        images.check_file(str(float_path))


def test_arrays_follow_the_same_rules():
    gray16 = _twelve_bit_image()
    np.testing.assert_array_equal(images.load_image(gray16), images.load_image(Image.fromarray(gray16)))
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent: white, as the HF processor composites it
    assert (images.load_image(rgba) == 255).all()
    with pytest.raises(images.ImageError, match="too small"):
        images.load_image(np.zeros((4, 40, 3), np.uint8))
    with pytest.raises(images.ImageError, match="aspect ratio"):
        images.load_image(np.zeros((8, 1700), np.uint8))
    with pytest.raises(images.ImageError, match="uint8"):
        images.load_image(np.zeros((10, 10, 3), np.float32))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK"])
def test_the_data_loader_and_the_backbone_preprocessor_read_a_file_to_the_same_pixels(tmp_path, mode):
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (24, 30, 4), dtype=np.uint8)
    rgba[:6, :, 3] = 0  # a fully transparent band: white under both
    image = Image.fromarray(rgba, "RGBA").convert(mode)
    if mode == "P":
        image.info["transparency"] = int(np.asarray(image)[0, 0])  # a palette transparency key
    path = tmp_path / f"img_{mode}.{'tif' if mode == 'CMYK' else 'png'}"
    image.save(path, **({"transparency": image.info["transparency"]} if mode == "P" else {}))
    data_pixels = images.load_image(str(path))
    np.testing.assert_array_equal(data_pixels, preprocessing.load_image(str(path)))
    assert data_pixels.shape == (24, 30, 3) and data_pixels.dtype == np.uint8
    if mode in ("RGBA", "LA", "P"):
        assert (data_pixels[:6] == 255).all()
    # A truncated file (fails while decoding, after the header): each reader's own error type, naming the file.
    Image.fromarray(rgba, "RGBA").save(tmp_path / "whole.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((tmp_path / "whole.png").read_bytes()[:-200])
    with pytest.raises(images.ImageError, match=r"truncated.png: corrupt or unreadable image"):
        images.load_image(str(truncated))
    with pytest.raises(preprocessing.ImageLoadError, match=r"truncated.png: corrupt or unreadable image"):
        preprocessing.load_image(str(truncated))
