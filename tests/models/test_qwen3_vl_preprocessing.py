"""Qwen3-VL image preprocessing, prompt building and the tiny tokenizer against transformers' own processor.

References: `Qwen2VLImageProcessorPil` (what transformers 5.23 uses for qwen3_vl without torchvision, or with
backend="pil") configured like the Qwen3-VL checkpoints, and `Qwen3VLProcessor` on the tiny tokenizer.
"""

import io

import numpy as np
import pytest
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLProcessor
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_qwen2_vl

from vital_jax.models.qwen3_vl import preprocessing as pp
from vital_jax.models.qwen3_vl import prompt as pr
from vital_jax.models.qwen3_vl.tiny_tokenizer import (TINY_SPECIAL_TOKEN_IDS, TokenizerBuildError,
                                                      build_tiny_tokenizer)

CORPUS = [
    "What is the abnormality in the left lung?",
    "There is a small nodule in the right upper lobe.",
    "Is the heart enlarged? No, the cardiac silhouette is normal.",
    "Describe the region of interest. The opacity is round, 12 mm, with smooth margins.",
]


def _hf_image_processor(**overrides):
    kwargs = dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                  size={"shortest_edge": pp.MIN_PIXELS, "longest_edge": pp.MAX_PIXELS})
    kwargs.update(overrides)
    return hf_qwen2_vl.Qwen2VLImageProcessorPil(**kwargs)


def _random_rgb(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _hf_pixels(processor, images):
    out = processor(images=images, return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


class _ImageTextQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3VLProcessor without its video sub-processor, which needs torchvision (not installed here).

    Only the attribute list changes; prompt expansion and tokenisation are transformers' own code.
    """

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_tokenizer"))
    build_tiny_tokenizer(path, CORPUS, vocab_size=200)
    return path


@pytest.fixture(scope="module")
def hf_processor(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return _ImageTextQwen3VLProcessor(image_processor=_hf_image_processor(), tokenizer=tokenizer,
                                      chat_template=tokenizer.chat_template)


# ----------------------------------------------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [(pp.MIN_PIXELS, pp.MAX_PIXELS), (4096, 128 * 128 * 2)], ids=["qwen3vl", "small"])
@pytest.mark.parametrize("size", [(50, 80), (300, 200), (448, 448), (1000, 130), (60, 1100)])
def test_pixels_and_grid_match_hf_pil_processor(size, budget):
    min_pixels, max_pixels = budget
    image = Image.fromarray(_random_rgb(*size, seed=size[0]))
    ours, grid = pp.preprocess_image(image, min_pixels=min_pixels, max_pixels=max_pixels)
    hf_pixels, hf_grid = _hf_pixels(
        _hf_image_processor(size={"shortest_edge": min_pixels, "longest_edge": max_pixels}), [image])
    np.testing.assert_array_equal(grid, hf_grid[0])
    assert ours.shape == hf_pixels.shape == (grid[1] * grid[2], 1536)
    assert ours.dtype == np.float32
    assert np.abs(ours - hf_pixels).max() <= 1e-5
    assert grid[1] % 2 == 0 and grid[2] % 2 == 0
    assert grid[1] * grid[2] * 256 <= max_pixels


def test_batch_of_images_matches_hf():
    images = [Image.fromarray(_random_rgb(h, w, seed=h)) for h, w in [(50, 80), (300, 200), (120, 640)]]
    ours, grids = pp.preprocess_images(images)
    hf_pixels, hf_grids = _hf_pixels(_hf_image_processor(), images)
    np.testing.assert_array_equal(grids, hf_grids)
    assert grids.shape == (3, 3)
    assert np.abs(ours - hf_pixels).max() <= 1e-5


def test_smart_resize_matches_hf_or_refuses_oversized_results():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(400):
        height, width = (int(v) for v in rng.integers(8, 3000, 2))
        if max(height, width) / min(height, width) > 200:
            continue
        min_pixels = int(rng.choice([1024, 4096, 65536]))
        max_pixels = int(rng.choice([65536, 262144, 16777216]))
        expected = hf_qwen2_vl.smart_resize(height, width, factor=32, min_pixels=min_pixels, max_pixels=max_pixels)
        if expected[0] * expected[1] > max_pixels:
            with pytest.raises(pp.ImagePreprocessError, match="cannot fit max_pixels"):
                pp.smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
        else:
            assert pp.smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels) == expected
            checked += 1
    assert checked > 300


def test_preprocessor_config_round_trip_through_auto_image_processor(tmp_path):
    pp.write_preprocessor_config(str(tmp_path), min_pixels=4096, max_pixels=128 * 128)
    hf = AutoImageProcessor.from_pretrained(str(tmp_path), backend="pil")
    assert type(hf).__name__ == "Qwen2VLImageProcessorPil"
    kwargs = pp.read_preprocessor_config(str(tmp_path))
    assert kwargs["max_pixels"] == 128 * 128 and kwargs["patch_size"] == 16
    image = Image.fromarray(_random_rgb(200, 330))
    ours, grid = pp.preprocess_image(image, **kwargs)
    hf_pixels, hf_grid = _hf_pixels(hf, [image])
    np.testing.assert_array_equal(grid, hf_grid[0])
    assert np.abs(ours - hf_pixels).max() <= 1e-5


def test_reads_settings_saved_by_transformers_processor(tmp_path, hf_processor):
    """transformers 5 saves the image processor nested in processor_config.json; incomplete configs are refused."""
    hf_processor.save_pretrained(str(tmp_path))
    assert not (tmp_path / "preprocessor_config.json").exists()
    kwargs = pp.read_preprocessor_config(str(tmp_path))
    assert kwargs == dict(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=pp.MIN_PIXELS,
                          max_pixels=pp.MAX_PIXELS, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    (tmp_path / "preprocessor_config.json").write_text('{"size": {"longest_edge": 4096, "shortest_edge": 1024}}')
    with pytest.raises(ValueError, match=r"preprocessor_config.json: missing \['patch_size'"):
        pp.read_preprocessor_config(str(tmp_path))


def test_patch_rows_follow_merge_block_order():
    """Row k of the patches is patch (r, c) of the 2x2-block order; checked on a position-coded image."""
    height, width = 64, 96  # grid 4x6
    rows, cols = np.meshgrid(np.arange(height) // 16, np.arange(width) // 16, indexing="ij")
    image = np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.float32)
    patches, grid = pp.patchify(image)
    np.testing.assert_array_equal(grid, [1, 4, 6])
    per_channel = patches.reshape(24, 3, 2, 16, 16)
    order = [(2 * br + r, 2 * bc + c) for br in range(2) for bc in range(3) for r in range(2) for c in range(2)]
    np.testing.assert_array_equal(per_channel[:, 0, 0, 0, 0], [r for r, _ in order])
    np.testing.assert_array_equal(per_channel[:, 1, 1, 0, 0], [c for _, c in order])  # second frame = first


# ----------------------------------------------------------------------------------------------------------------
# Image modes
# ----------------------------------------------------------------------------------------------------------------


def test_grayscale_and_palette_images_match_hf():
    gray = Image.fromarray(_random_rgb(90, 140)[:, :, 0], mode="L")
    palette = Image.fromarray(_random_rgb(90, 140)).convert("P", palette=Image.Palette.ADAPTIVE)
    for image in (gray, palette):
        ours, grid = pp.preprocess_image(image)
        hf_pixels, hf_grid = _hf_pixels(_hf_image_processor(), [image])
        np.testing.assert_array_equal(grid, hf_grid[0])
        assert np.abs(ours - hf_pixels).max() <= 1e-5
    rgb = pp.load_image(gray)
    assert rgb.shape == (90, 140, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[:, :, 0], rgb[:, :, 2])


def test_rgba_composites_on_white_like_hf_or_drops_alpha():
    rgba = _random_rgb(100, 120).copy()
    alpha = np.random.default_rng(1).integers(0, 256, (100, 120), dtype=np.uint8)
    image = Image.fromarray(np.concatenate([rgba, alpha[:, :, None]], axis=-1), mode="RGBA")
    ours, _ = pp.preprocess_image(image)
    hf_pixels, _ = _hf_pixels(_hf_image_processor(), [image])
    assert np.abs(ours - hf_pixels).max() <= 1e-5
    np.testing.assert_array_equal(pp.load_image(image, alpha="drop"), rgba)
    transparent = pp.load_image(Image.new("RGBA", (20, 20), (10, 20, 30, 0)))
    assert (transparent == 255).all()


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_wider_than_8_bit_images_are_refused_in_favour_of_the_shared_window(mode, tmp_path):
    # The window of 16-bit images is vital_jax.data.images' (one rule for every stage), not a second one here.
    image = Image.fromarray(_random_rgb(80, 60)[:, :, 0].astype(np.uint16) * 257)
    if mode != "I;16":
        image = image.convert(mode)
    assert image.mode == mode
    with pytest.raises(pp.ImageLoadError, match="vital_jax.data.images"):
        pp.load_image(image)
    path = tmp_path / ("gray16.png" if mode == "I;16" else "gray32.tiff")  # PIL writes 'I' and 'F' to TIFF
    image.save(path)
    with pytest.raises(pp.ImageLoadError, match=f"{path.name}: mode '{mode}' has more than 8 bits"):
        pp.preprocess_image(str(path))
    with pytest.raises(pp.ImageLoadError, match="window wider images"):
        pp.load_image(np.zeros((10, 10), np.uint16))


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


def test_truncated_png_names_the_file(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(_random_rgb(64, 64)).save(buffer, format="PNG")
    path = tmp_path / "truncated.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(pp.ImageLoadError, match="truncated.png"):
        pp.preprocess_image(str(path))
    with pytest.raises(pp.ImageLoadError, match="missing.png"):
        pp.load_image(str(tmp_path / "missing.png"))
    with pytest.raises(pp.ImageLoadError, match=r"image 1: .*truncated.png"):
        pp.preprocess_images([Image.fromarray(_random_rgb(64, 64)), str(path)])


def test_bad_sizes_and_budgets_raise_clear_errors():
    # Sizes read width x height, as PIL's and data.images' messages do: this image is 4 rows of 50 pixels.
    with pytest.raises(pp.ImagePreprocessError, match="image of 50x4 pixels is too small"):
        pp.preprocess_image(Image.fromarray(_random_rgb(4, 50)))
    with pytest.raises(pp.ImagePreprocessError, match="aspect ratio"):
        pp.smart_resize(10, 2500)
    with pytest.raises(pp.ImagePreprocessError, match="below one merge block"):
        pp.smart_resize(100, 100, min_pixels=0, max_pixels=1000)
    with pytest.raises(pp.ImagePreprocessError, match="exceeds max_pixels"):
        pp.smart_resize(100, 100, min_pixels=8192, max_pixels=4096)
    with pytest.raises(pp.ImagePreprocessError, match="cannot fit max_pixels"):
        pp.smart_resize(10, 1500, min_pixels=1024, max_pixels=32 * 32 * 8)
    with pytest.raises(pp.ImagePreprocessError, match="rounds to"):
        pp.smart_resize(10, 100, min_pixels=0)
    with pytest.raises(pp.ImagePreprocessError, match="not divisible by merge_size"):
        pp.patchify(np.zeros((48, 64, 3), np.float32))  # grid 3x4: odd height
    with pytest.raises(pp.ImageLoadError, match="uint8"):
        pp.load_image(np.zeros((10, 10, 3), np.float32))


# ----------------------------------------------------------------------------------------------------------------
# Fixed shapes
# ----------------------------------------------------------------------------------------------------------------


def test_pixel_budget_and_bucket_padding():
    budget = pp.max_pixels_for_patches(256)
    images = [Image.fromarray(_random_rgb(h, w, seed=h)) for h, w in [(700, 500), (90, 300), (1000, 130)]]
    for image in images:
        patches, grid = pp.preprocess_image(image, min_pixels=1024, max_pixels=budget)
        assert patches.shape[0] <= 256
        padded, valid = pp.pad_patches(patches, grid, bucket_sizes=[64, 128, 256])
        n = patches.shape[0]
        assert padded.shape[0] == min(b for b in (64, 128, 256) if b >= n)
        np.testing.assert_array_equal(padded[:n], patches)
        assert not padded[n:].any()
        assert valid.sum() == n and valid[:n].all()
        np.testing.assert_array_equal(valid[::4], np.arange(padded.shape[0] // 4) < n // 4)

    patches, grids = pp.preprocess_images(images[:2], min_pixels=1024, max_pixels=budget)
    padded, valid = pp.pad_patches(patches, grids, bucket_sizes=[512, 1024])
    segments = pp.patch_segment_ids(grids, len(padded))
    counts = np.prod(grids, axis=1)
    np.testing.assert_array_equal(np.bincount(segments[segments >= 0]), counts)
    assert ((segments >= 0) == valid).all()

    with pytest.raises(pp.ImagePreprocessError, match="exceed the largest bucket"):
        pp.pad_patches(patches, grids, bucket_sizes=[64])
    with pytest.raises(pp.ImagePreprocessError, match="multiples of merge_size"):
        pp.pad_patches(patches, grids, bucket_sizes=[1026])
    with pytest.raises(pp.ImagePreprocessError, match="accounts for"):
        pp.pad_patches(patches[:-4], grids, bucket_sizes=[1024])


def test_segment_mask_makes_padding_invisible_to_real_patches():
    """The masking recipe in `pad_patches`: attention restricted to equal segment ids ignores padding."""
    images = [Image.fromarray(_random_rgb(h, w, seed=h)) for h, w in [(64, 96), (96, 64)]]
    patches, grids = pp.preprocess_images(images, min_pixels=1024, max_pixels=pp.max_pixels_for_patches(64))
    padded, valid = pp.pad_patches(patches, grids, bucket_sizes=[64])
    rng = np.random.default_rng(0)
    w_q, w_k = rng.normal(size=(2, 1536, 8)) / 40

    def attention(x, segments):
        scores = (x @ w_q) @ (x @ w_k).T
        scores = np.where(segments[:, None] == segments[None, :], scores, -np.inf)
        weights = np.exp(scores - scores.max(axis=1, keepdims=True))
        return (weights / weights.sum(axis=1, keepdims=True)) @ x

    unpadded = attention(patches, pp.patch_segment_ids(grids))
    with_padding = attention(padded, pp.patch_segment_ids(grids, len(padded)))
    assert np.isfinite(with_padding).all()
    np.testing.assert_allclose(with_padding[valid], unpadded, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and prompts
# ----------------------------------------------------------------------------------------------------------------


def test_tiny_tokenizer_pins_special_ids_and_loads_in_transformers(tokenizer_dir):
    ours = pr.load_tokenizer(tokenizer_dir)
    assert pr.special_token_ids(ours) == TINY_SPECIAL_TOKEN_IDS
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    for token, token_id in TINY_SPECIAL_TOKEN_IDS.items():
        assert hf.convert_tokens_to_ids(token) == token_id
    assert max(ours.get_vocab().values()) < 200
    assert hf.eos_token == pr.IM_END and hf.pad_token == pr.ENDOFTEXT
    for text in CORPUS + ["An unseen sentence with digits 0123 and symbols #%&."]:
        ids = ours.encode(text).ids
        assert hf(text)["input_ids"] == ids
        assert ours.decode(ids) == text
    assert ours.encode("é").tokens == ["<unk>", "<unk>"]  # outside the tiny alphabet: visible, not dropped


def test_tiny_tokenizer_other_layouts_and_errors(tmp_path):
    layout = {token: i for i, token in enumerate(pr.SPECIAL_TOKENS)}  # specials first
    tokenizer = build_tiny_tokenizer(str(tmp_path / "a"), CORPUS, vocab_size=150, special_token_ids=layout)
    assert pr.special_token_ids(tokenizer) == layout
    assert max(tokenizer.get_vocab().values()) < 150
    with pytest.raises(TokenizerBuildError, match="distinct"):
        build_tiny_tokenizer(str(tmp_path / "b"), CORPUS, 200, special_token_ids={**layout, pr.IM_END: 0})
    with pytest.raises(TokenizerBuildError, match="fewer than"):
        build_tiny_tokenizer(str(tmp_path / "c"), CORPUS, 60, special_token_ids=layout)
    with pytest.raises(TokenizerBuildError, match="lacks"):
        build_tiny_tokenizer(str(tmp_path / "d"), CORPUS, 200, special_token_ids={pr.IM_END: 3})


def _hf_prompt_ids(processor, images, question, answer=None, system=None):
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": [*({"type": "image", "image": im} for im in images),
                                                  {"type": "text", "text": question}]})
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    text = processor.apply_chat_template(messages, add_generation_prompt=answer is None, tokenize=False)
    out = processor(text=[text], images=images or None, return_tensors="np")
    return out["input_ids"][0], out.get("image_grid_thw"), text


@pytest.mark.parametrize("case", ["one_image", "two_images", "with_answer", "with_system", "text_only"])
def test_prompt_ids_match_hf_processor(case, tokenizer_dir, hf_processor):
    images = [Image.fromarray(_random_rgb(300, 200)), Image.fromarray(_random_rgb(50, 80, seed=1))]
    images = {"two_images": images, "text_only": []}.get(case, images[:1])
    question = "What is the abnormality in the left lung?"
    answer = "A small nodule, 12 mm." if case == "with_answer" else None
    system = "You are a radiologist." if case == "with_system" else None
    hf_ids, hf_grids, hf_text = _hf_prompt_ids(hf_processor, images, question, answer, system)

    if images:
        _, grids = pp.preprocess_images(images)
        np.testing.assert_array_equal(grids, hf_grids)
    else:
        grids = np.zeros((0, 3), np.int64)
    tokens = pr.tokenize_prompt(pr.load_tokenizer(tokenizer_dir), question, grids, answer=answer, system=system)
    assert tokens.input_ids.dtype == np.int32
    np.testing.assert_array_equal(tokens.input_ids, hf_ids)
    # The chat template writes one pad per image; the processor expands pad i to n_i pads.
    counts = np.prod(grids, axis=1) // 4
    pieces = hf_text.split(pr.IMAGE_PAD)
    assert len(pieces) == len(counts) + 1
    expanded = pieces[0] + "".join(pr.IMAGE_PAD * int(n) + piece for n, piece in zip(counts, pieces[1:]))
    assert pr.render_prompt(question, grids, answer=answer, system=system) == expanded
    expected_pads = int(counts.sum())
    assert len(tokens.image_positions) == expected_pads
    assert (tokens.input_ids[tokens.image_positions] == TINY_SPECIAL_TOKEN_IDS[pr.IMAGE_PAD]).all()
    header = pr.load_tokenizer(tokenizer_dir).encode(f"{pr.IM_START}assistant\n").ids
    np.testing.assert_array_equal(tokens.input_ids[tokens.prompt_length - len(header):tokens.prompt_length], header)
    # MedSynapse-V's "user_turn" memory goes before the prompt's last user_turn_end_length tokens: they decode to
    # the end of the user turn and the assistant header, whatever the question.
    closing = pr.user_turn_end_length(pr.load_tokenizer(tokenizer_dir))
    assert pr.load_tokenizer(tokenizer_dir).decode(
        tokens.input_ids[tokens.prompt_length - closing:tokens.prompt_length].tolist(),
        skip_special_tokens=False) == f"{pr.IM_END}\n{pr.IM_START}assistant\n"
    if answer is None:
        assert tokens.prompt_length == len(tokens.input_ids)
    else:
        tail = tokens.input_ids[tokens.prompt_length:]
        assert pr.load_tokenizer(tokenizer_dir).decode(tail.tolist(), skip_special_tokens=False) == \
            f"{answer}{pr.IM_END}\n"


def test_prompt_accepts_transformers_tokenizer(tokenizer_dir):
    grid = np.array([1, 20, 14])
    from_hf = pr.tokenize_prompt(AutoTokenizer.from_pretrained(tokenizer_dir), "Is the heart enlarged?", grid)
    from_file = pr.tokenize_prompt(pr.load_tokenizer(tokenizer_dir), "Is the heart enlarged?", grid)
    np.testing.assert_array_equal(from_hf.input_ids, from_file.input_ids)


def test_image_token_mismatches_raise(tokenizer_dir, tmp_path):
    tokenizer = pr.load_tokenizer(tokenizer_dir)
    grid = np.array([1, 4, 6])
    with pytest.raises(pr.PromptError, match="image-pad tokens but grid_thw"):
        pr.tokenize_prompt(tokenizer, f"Is this {pr.IMAGE_PAD} normal?", grid)
    tokens = pr.tokenize_prompt(tokenizer, "Is this normal?", grid)
    ids = dict(image_token_id=190, vision_start_id=188, vision_end_id=189)
    with pytest.raises(pr.PromptError, match="needs 8"):
        pr.check_image_tokens(tokens.input_ids, np.array([1, 4, 8]), **ids)
    with pytest.raises(pr.PromptError, match="runs of lengths"):
        pr.check_image_tokens(tokens.input_ids, np.array([[1, 2, 6], [1, 2, 6]]), **ids)
    with pytest.raises(pr.PromptError, match="multiples of merge_size"):
        pr.num_image_tokens(np.array([1, 3, 6]))
    broken = tokens.input_ids.copy()
    broken[tokens.image_positions[0] - 1] = 0
    with pytest.raises(pr.PromptError, match="not framed"):
        pr.check_image_tokens(broken, grid, **ids)
    with pytest.raises(pr.PromptError, match="tokenizer.json: not found"):
        pr.load_tokenizer(str(tmp_path))


def test_batch_prompts_right_pads(tokenizer_dir):
    tokenizer = pr.load_tokenizer(tokenizer_dir)
    prompts = [pr.tokenize_prompt(tokenizer, q, np.array([1, 4, 4])) for q in ("Short?", "A much longer question?")]
    input_ids, mask = pr.batch_prompts(prompts, pad_id=185, length=64)
    assert input_ids.shape == mask.shape == (2, 64)
    for row, prompt in enumerate(prompts):
        np.testing.assert_array_equal(input_ids[row, :len(prompt.input_ids)], prompt.input_ids)
        assert mask[row].sum() == len(prompt.input_ids) and (input_ids[row, ~mask[row]] == 185).all()
    with pytest.raises(pr.PromptError, match="more than length"):
        pr.batch_prompts(prompts, pad_id=185, length=8)


@pytest.mark.parametrize("size,budget", [((64, 64), (4096, 96 * 96)), ((480, 640), (65536, 448 * 448)),
                                         ((1000, 300), (65536, 448 * 448)), ((50, 70), (4096, 200 * 200))])
def test_grid_for_size_is_the_grid_preprocessing_gives(size, budget):
    rgb = np.random.RandomState(0).randint(0, 256, (*size, 3), np.uint8)
    _, grid = pp.preprocess_image(rgb, min_pixels=budget[0], max_pixels=budget[1])
    np.testing.assert_array_equal(pp.grid_for_size(*size, min_pixels=budget[0], max_pixels=budget[1]), grid)
