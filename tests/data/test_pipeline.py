"""grain input pipeline: batch contract, curriculum K filter, seeded order, resumable state, sharding, errors."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

from vital_jax.data import pipeline
from vital_jax.data.records import Record, RecordError, write_records
from vital_jax.models.qwen3_vl import preprocessing, prompt
from vital_jax.models.qwen3_vl.tiny_tokenizer import build_tiny_tokenizer

DV = 16
CFG = pipeline.PipelineConfig(batch_size=2, prompt_buckets=(32, 48, 64, 128), max_answer_tokens=24,
                              max_step_tokens=10, k_max_slots=4, min_pixels=4096, max_pixels=96 * 96,
                              read_threads=2, prefetch_buffer_size=2)
# (split, latent_steps, image size (h, w)); 9 train records (4 with K=1), 3 test records.
LAYOUT = [("train", 1, (64, 64)), ("train", 2, (64, 96)), ("train", 1, (96, 64)), ("train", 3, (80, 80)),
          ("train", 4, (64, 64)), ("train", 1, (96, 96)), ("train", 2, (64, 80)), ("train", 1, (72, 64)),
          ("train", 3, (64, 64)), ("test", 1, (64, 64)), ("test", 2, (96, 64)), ("test", 4, (64, 96))]
QUESTIONS = ["Is there a lesion in the liver?", "Where is the kidney located?", "What organ is shown here?",
             "Describe the abnormal region in this image."]
STEPS = ["The liver appears in the upper left of the scan.", "A bright round region sits near the boundary.",
         "Its margin is smooth and well defined everywhere along the edge of the organ.", "So the answer is yes."]


def _write_dataset(root: str) -> list[Record]:
    rng = np.random.RandomState(0)
    os.makedirs(root, exist_ok=True)
    records = []
    for i, (split, k, (h, w)) in enumerate(LAYOUT):
        Image.fromarray(rng.randint(0, 256, (h, w, 3), np.uint8)).save(os.path.join(root, f"img{i}.png"))
        Image.fromarray(np.full((h, w), 255, np.uint8)).save(os.path.join(root, f"mask{i}.png"))
        records.append(Record(id=f"rec{i}", image=f"img{i}.png", mask=f"mask{i}.png", question=QUESTIONS[i % 4],
                              answer=["yes", "left kidney", "the liver", "a round lesion"][i % 4],
                              reasoning_chain=tuple(STEPS[:k]), latent_steps=k, question_type="reasoning",
                              target="liver", target_type="organ", modality="CT", source="test", split=split,
                              roi_index=len(LAYOUT) - 1 - i))
    write_records(os.path.join(root, "records.jsonl"), records)
    features = rng.randn(len(LAYOUT), DV).astype(np.float32)
    np.save(os.path.join(root, "roi_features.npy"), features / np.linalg.norm(features, axis=1, keepdims=True))
    np.save(os.path.join(root, "roi_top_patch_ids.npy"), np.zeros((len(LAYOUT), 5), np.int32))
    np.save(os.path.join(root, "roi_top_patch_scores.npy"), np.zeros((len(LAYOUT), 5), np.float32))
    return records


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pipeline"))
    records = _write_dataset(os.path.join(root, "data"))
    tokenizer_dir = os.path.join(root, "tokenizer")
    build_tiny_tokenizer(tokenizer_dir, QUESTIONS + STEPS + [r.answer for r in records], vocab_size=300)
    return os.path.join(root, "data"), tokenizer_dir, records


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _epoch_order(data_dir, tokenizer_dir, k_max=4, seed=0, process_index=0, process_count=1):
    it = pipeline.make_train_iterator(data_dir, tokenizer_dir, CFG, k_max=k_max, seed=seed,
                                      process_index=process_index, process_count=process_count, num_epochs=1)
    return [int(i) for batch in it for i in batch["record_index"]]


def test_batch_matches_contract_and_reference_preprocessing(dataset):
    data_dir, tokenizer_dir, records = dataset
    tokenizer = prompt.load_tokenizer(tokenizer_dir)
    ids = prompt.special_token_ids(tokenizer)
    roi = np.load(os.path.join(data_dir, "roi_features.npy"))
    batch = next(pipeline.make_train_iterator(data_dir, tokenizer_dir, CFG, k_max=4, seed=1, process_index=0,
                                              process_count=1))
    b, tp = batch["prompt_ids"].shape
    np_rows = batch["pixel_patches"].shape[0]
    expected = dict(prompt_ids=((b, tp), np.int32), prompt_valid=((b, tp), bool),
                    pixel_patches=((np_rows, 1536), np.float32), image_grid_thw=((b, 3), np.int32),
                    answer_ids=((b, 24), np.int32), answer_valid=((b, 24), bool), latent_steps=((b,), np.int32),
                    step_ids=((b, 4, 10), np.int32), step_valid=((b, 4, 10), bool), roi_feature=((b, DV), np.float32),
                    record_index=((b,), np.int32), example_valid=((b,), bool))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (s, np.dtype(d)) for k, (s, d) in expected.items()}
    assert b == 2 and tp in CFG.prompt_buckets and np_rows in CFG.patch_bucket_sizes and batch["example_valid"].all()

    offset = 0
    for i, row in enumerate(batch["record_index"]):
        record = records[row]
        patches, grid = preprocessing.preprocess_image(os.path.join(data_dir, record.image), min_pixels=4096,
                                                       max_pixels=96 * 96)
        np.testing.assert_array_equal(batch["pixel_patches"][offset:offset + len(patches)], patches)
        np.testing.assert_array_equal(batch["image_grid_thw"][i], grid)
        offset += len(patches)
        # Left padding: the prompt occupies the last n slots, so its last token sits at Tp-1.
        prompt_ids = prompt.tokenize_prompt(tokenizer, record.question, grid).input_ids
        n = len(prompt_ids)
        np.testing.assert_array_equal(batch["prompt_valid"][i], np.arange(tp) >= tp - n)
        np.testing.assert_array_equal(batch["prompt_ids"][i, tp - n:], prompt_ids)
        assert (batch["prompt_ids"][i, :tp - n] == ids[prompt.ENDOFTEXT]).all()
        answer = tokenizer.encode(record.answer + prompt.IM_END, add_special_tokens=False).ids
        np.testing.assert_array_equal(batch["answer_valid"][i], np.arange(24) < len(answer))
        np.testing.assert_array_equal(batch["answer_ids"][i, :len(answer)], answer)
        assert answer[-1] == ids[prompt.IM_END]
        assert batch["latent_steps"][i] == record.latent_steps
        for k in range(4):
            if k < record.latent_steps:
                step = tokenizer.encode(record.reasoning_chain[k] + prompt.IM_END, add_special_tokens=False).ids[:10]
                np.testing.assert_array_equal(batch["step_ids"][i, k, :len(step)], step)
                np.testing.assert_array_equal(batch["step_valid"][i, k], np.arange(10) < len(step))
            else:
                assert not batch["step_valid"][i, k].any()
        np.testing.assert_array_equal(batch["roi_feature"][i], roi[record.roi_index])
    assert not batch["pixel_patches"][offset:].any()  # zero rows after the real patches


def test_k_filter_and_split_select_records(dataset):
    data_dir, tokenizer_dir, records = dataset
    for k_max in (1, 2, 4):
        order = _epoch_order(data_dir, tokenizer_dir, k_max=k_max)
        eligible = {i for i, r in enumerate(records) if r.split == "train" and r.latent_steps <= k_max}
        assert len(order) == len(eligible) // 2 * 2 and set(order) <= eligible  # full batches only
    with pytest.raises(pipeline.PipelineError, match="k_max=5"):
        pipeline.make_train_iterator(data_dir, tokenizer_dir, CFG, k_max=5, process_index=0, process_count=1)


def test_same_seed_same_order_and_epochs_reshuffle(dataset):
    data_dir, tokenizer_dir, _ = dataset
    assert _epoch_order(data_dir, tokenizer_dir, seed=3) == _epoch_order(data_dir, tokenizer_dir, seed=3)
    assert _epoch_order(data_dir, tokenizer_dir, seed=3) != _epoch_order(data_dir, tokenizer_dir, seed=4)
    two_epochs = pipeline.make_train_iterator(data_dir, tokenizer_dir, CFG, k_max=4, seed=3, process_index=0,
                                              process_count=1, num_epochs=2)
    order = [int(i) for batch in two_epochs for i in batch["record_index"]]
    assert len(order) == 18 and sorted(order[:9]) == sorted(order[9:]) and order[:9] != order[9:]


def test_iterator_state_resumes_exactly(dataset):
    data_dir, tokenizer_dir, _ = dataset
    make = lambda: pipeline.make_train_iterator(data_dir, tokenizer_dir, CFG, k_max=4, seed=7,  # noqa: E731
                                                process_index=0, process_count=1)
    it = make()
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # the state is small and JSON-able: it goes in the checkpoint
    expected = _take(it, 4)  # runs past the first epoch (4 batches of 2 per epoch)
    resumed = make()
    resumed.set_state(state)
    for want, got in zip(expected, _take(resumed, 4)):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_the_processes_batches_of_a_step_are_the_batch_of_one_process_with_their_total_size(dataset):
    """Two processes of batch 2 train, step by step and across an epoch boundary, on the records one process of
    batch 4 trains on. Shuffling each process's fixed shard with a shared seed made each step's global batch pairs
    of consecutive records (an image's questions), the same pairs every epoch."""
    data_dir, tokenizer_dir, _ = dataset

    def batches(batch_size, process_index, process_count):
        it = pipeline.make_train_iterator(data_dir, tokenizer_dir, dataclasses.replace(CFG, batch_size=batch_size),
                                          k_max=4, seed=5, process_index=process_index, process_count=process_count,
                                          num_epochs=2)
        return [sorted(int(i) for i in batch["record_index"]) for batch in it]

    whole = batches(4, 0, 1)
    parts = [batches(2, p, 2) for p in range(2)]
    assert len(whole) == 4 and all(len(part) >= len(whole) for part in parts)  # 18 records: 4 global steps
    for step, batch in enumerate(whole):
        assert sorted(parts[0][step] + parts[1][step]) == batch, step


def test_process_shards_partition_records(dataset):
    data_dir, tokenizer_dir, records = dataset
    train = [set(_epoch_order(data_dir, tokenizer_dir, process_index=p, process_count=2)) for p in range(2)]
    assert not train[0] & train[1] and len(train[0]) == len(train[1]) == 4  # 9 records: 2 batches of 2 each
    assert train[0] | train[1] <= {i for i, r in enumerate(records) if r.split == "train"}

    test_rows = [i for i, r in enumerate(records) if r.split == "test"]
    seen, batch_counts = [], []
    for p in range(2):
        batches = list(pipeline.make_eval_batches(data_dir, tokenizer_dir, CFG, split="test", process_index=p,
                                                  process_count=2))
        batch_counts.append(len(batches))
        seen += [int(i) for b in batches for i, ok in zip(b["record_index"], b["example_valid"]) if ok]
    assert sorted(seen) == test_rows and batch_counts == [1, 1]  # 3 records: 2 + (1 + 1 padding example)


def test_eval_batches_keep_every_record_once_and_pad_the_tail(dataset):
    data_dir, tokenizer_dir, records = dataset
    batches = list(pipeline.make_eval_batches(data_dir, tokenizer_dir, CFG, split="train", process_index=0,
                                              process_count=1))
    assert len(batches) == 5 and all(b["prompt_ids"].shape[0] == 2 for b in batches)
    valid = [int(i) for b in batches for i, ok in zip(b["record_index"], b["example_valid"]) if ok]
    assert valid == [i for i, r in enumerate(records) if r.split == "train"]  # file order
    assert batches[-1]["example_valid"].tolist() == [True, False]


def test_corrupt_image_error_names_the_record(dataset, tmp_path):
    data_dir, tokenizer_dir, records = dataset
    broken = str(tmp_path / "broken")
    _write_dataset(broken)
    with open(os.path.join(broken, "img10.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(pipeline.PipelineError,
                       match=r"record 'rec10' \(records.jsonl row 10\).*img10.png: corrupt or unreadable image"):
        list(pipeline.make_eval_batches(broken, tokenizer_dir, CFG, split="test", process_index=0, process_count=1))


def test_too_long_answer_and_missing_roi_are_named(dataset, tmp_path):
    data_dir, tokenizer_dir, records = dataset
    short = dataclasses.replace(CFG, max_answer_tokens=2)
    with pytest.raises(pipeline.PipelineError, match="record 'rec9'.*max_answer_tokens=2"):
        next(pipeline.make_eval_batches(data_dir, tokenizer_dir, short, split="test", process_index=0,
                                        process_count=1))
    no_roi = str(tmp_path / "no_roi")
    written = _write_dataset(no_roi)
    write_records(os.path.join(no_roi, "records.jsonl"),
                  [dataclasses.replace(r, roi_index=-1) if r.id == "rec3" else r for r in written])
    with pytest.raises(pipeline.PipelineError, match=r"no ROI feature row.*\['rec3'\]"):
        pipeline.make_train_iterator(no_roi, tokenizer_dir, CFG, k_max=4, process_index=0, process_count=1)


def test_answers_longer_than_the_budget_are_found_before_training_with_the_length_to_set(dataset, tmp_path):
    data_dir, tokenizer_dir, records = dataset
    tokenizer = prompt.load_tokenizer(tokenizer_dir)
    train = [r for r in records if r.split == "train"]
    lengths = {r.id: len(tokenizer.encode(r.answer + "<|im_end|>", add_special_tokens=False).ids) for r in train}
    longest = max(lengths.values())
    pipeline.check_answer_lengths(data_dir, tokenizer_dir, dataclasses.replace(CFG, max_answer_tokens=longest),
                                  "train")
    budget = longest - 1
    over = [i for i, n in lengths.items() if n > budget]
    with pytest.raises(pipeline.PipelineError, match=rf"{len(over)} answer\(s\) of split 'train' are longer than "
                                                     rf"max_answer_tokens={budget}.*the longest {longest} tokens.*"
                                                     rf"set data.max_answer_tokens >= {longest}"):
        pipeline.check_answer_lengths(data_dir, tokenizer_dir, dataclasses.replace(CFG, max_answer_tokens=budget),
                                      "train")


def test_reasoning_steps_longer_than_the_budget_are_reported_with_the_length_to_set(dataset):
    data_dir, tokenizer_dir, records = dataset
    tokenizer = prompt.load_tokenizer(tokenizer_dir)
    lengths = {(r.id, k): len(tokenizer.encode(step + "<|im_end|>", add_special_tokens=False).ids)
               for r in records if r.split == "train" for k, step in enumerate(r.reasoning_chain)}
    longest = max(lengths.values())
    assert pipeline.long_reasoning_steps(data_dir, tokenizer_dir, dataclasses.replace(CFG, max_step_tokens=longest),
                                         "train") is None
    budget = longest - 1
    over = [key for key, n in lengths.items() if n > budget]
    record_id, k = next(key for key, n in lengths.items() if n == longest)
    message = pipeline.long_reasoning_steps(data_dir, tokenizer_dir, dataclasses.replace(CFG, max_step_tokens=budget),
                                            "train")
    assert (f"{len(over)} of the {len(lengths)} reasoning steps of split 'train' are longer than max_step_tokens="
            f"{budget}") in message
    assert f"step {k + 1} of record {record_id!r}" in message and f"data.max_step_tokens >= {longest}" in message


def test_global_feature_rows_follow_roi_index_and_a_missing_file_is_named(dataset, tmp_path):
    data_dir, tokenizer_dir, records = dataset
    with_global = dataclasses.replace(CFG, global_feature=True)
    missing = str(tmp_path / "no_global")
    _write_dataset(missing)
    with pytest.raises(pipeline.PipelineError, match=r"global_features.npy not found.*--global_features"):
        pipeline.make_train_iterator(missing, tokenizer_dir, with_global, k_max=4, process_index=0, process_count=1)

    root = str(tmp_path / "global")
    written = _write_dataset(root)
    global_rows = np.random.RandomState(3).randn(len(LAYOUT), DV).astype(np.float32)
    np.save(os.path.join(root, "global_features.npy"), global_rows)
    batch = next(pipeline.make_train_iterator(root, tokenizer_dir, with_global, k_max=4, seed=1, process_index=0,
                                              process_count=1))
    assert batch["global_feature"].shape == (CFG.batch_size, DV) and batch["global_feature"].dtype == np.float32
    for row, feature in zip(batch["record_index"], batch["global_feature"]):
        np.testing.assert_array_equal(feature, global_rows[written[row].roi_index])
    eval_batch = next(pipeline.make_eval_batches(root, tokenizer_dir, with_global, split="test", process_index=0,
                                                 process_count=1))
    np.testing.assert_array_equal(eval_batch["global_feature"][0], global_rows[written[9].roi_index])
    # Without the option the batch contract is unchanged.
    assert "global_feature" not in next(pipeline.make_train_iterator(root, tokenizer_dir, CFG, k_max=4,
                                                                    process_index=0, process_count=1))
    np.save(os.path.join(root, "global_features.npy"), global_rows[:3])
    with pytest.raises(RecordError, match=r"global_features.npy: float32 \(3, 16\), expected float32 \(12, 16\)"):
        pipeline.make_train_iterator(root, tokenizer_dir, with_global, k_max=4, process_index=0, process_count=1)


def test_config_rejects_patch_buckets_too_small_for_a_batch():
    with pytest.raises(pipeline.PipelineError, match="largest patch bucket 64"):
        pipeline.PipelineConfig(batch_size=2, max_pixels=96 * 96, patch_buckets=(32, 64))
    assert CFG.patch_bucket_sizes == (20, 36, 72)  # B * 36 patches / 4, / 2, / 1, in multiples of 4


def test_a_loader_state_records_its_data_order_and_another_order_is_refused(dataset):
    """The multi-process order changed (each process's own shuffled shard -> one stream dealt round-robin) and
    nothing in a checkpoint said which order its position counted in: a resumed run took it in the new order."""
    data_dir, tokenizer_dir, _ = dataset
    make = lambda count: pipeline.make_train_iterator(data_dir, tokenizer_dir, CFG, k_max=2, seed=7,  # noqa: E731
                                                      process_index=0, process_count=count)
    it = make(1)
    _take(it, 1)
    state = it.get_state()
    assert state["data_order"] == pipeline.DATA_ORDER and isinstance(state["position"], dict)
    # Saved before the order was recorded (grain's own state): one process's order never changed, so it resumes.
    expected = [b["record_index"].tolist() for b in _take(it, 2)]
    legacy = make(1)
    legacy.set_state(state["position"])
    assert [b["record_index"].tolist() for b in _take(legacy, 2)] == expected
    with pytest.raises(pipeline.PipelineError, match="data order 1.*2 processes.*new --workdir"):
        make(2).set_state(state["position"])
    with pytest.raises(pipeline.PipelineError, match="data order 99"):
        make(1).set_state({**state, "data_order": 99})


def test_a_loader_state_resumes_only_under_the_global_batch_it_counted_in(dataset):
    """A position counts steps of processes x batch records: restored on another number of processes with the
    same per-process batch it replayed records already trained on (a 2-process state on 1 process: half of them)."""
    data_dir, tokenizer_dir, _ = dataset

    def make(count, index=0, batch=CFG.batch_size):
        return pipeline.make_train_iterator(data_dir, tokenizer_dir, dataclasses.replace(CFG, batch_size=batch),
                                            k_max=4, seed=5, process_index=index, process_count=count,
                                            num_epochs=4)

    pair = [make(2, index) for index in range(2)]
    for it in pair:
        _take(it, 1)
    state = pair[0].get_state()
    assert (state["process_count"], state["batch_size"]) == (2, CFG.batch_size)
    with pytest.raises(pipeline.PipelineError, match=r"2 process\(es\) x batch 2 = 4 examples per step, this run "
                                                     r"takes 1 x 2 = 2.*resume with 4 examples per step"):
        make(1).set_state(state)
    # The same global batch over another number of processes: every step covers the same records.
    expected = [sorted(a["record_index"].tolist() + b["record_index"].tolist())
                for a, b in zip(_take(pair[0], 2), _take(pair[1], 2))]
    one = make(1, batch=2 * CFG.batch_size)
    one.set_state(state)
    assert [sorted(b["record_index"].tolist()) for b in _take(one, 2)] == expected
    # States saved before the global batch was recorded are not checked (nothing to check them against).
    legacy = {k: v for k, v in state.items() if k not in ("process_count", "batch_size")}
    make(1).set_state(legacy)


def test_worker_processes_resume_and_name_the_failing_record(dataset, tmp_path):
    data_dir, tokenizer_dir, _ = dataset
    cfg = dataclasses.replace(CFG, num_workers=1)
    make = lambda d: pipeline.make_train_iterator(d, tokenizer_dir, cfg, k_max=4, seed=2,  # noqa: E731
                                                  process_index=0, process_count=1)
    it = make(data_dir)
    _take(it, 2)
    state = it.get_state()
    expected = [b["record_index"].tolist() for b in _take(it, 3)]
    it.close()
    resumed = make(data_dir)
    resumed.set_state(state)
    assert [b["record_index"].tolist() for b in _take(resumed, 3)] == expected
    resumed.close()

    broken = str(tmp_path / "broken")
    _write_dataset(broken)
    with open(os.path.join(broken, "img4.png"), "wb") as f:
        f.write(b"junk")
    it = make(broken)
    with pytest.raises(pipeline.PipelineError, match=r"record 'rec4' \(records.jsonl row 4\)"):
        _take(it, 5)  # one epoch holds every record
    it.close()


def test_blind_images_keep_the_tokens_and_erase_the_pixels(dataset):
    """The text-only control: same prompts, grids and patch shapes, every pixel mid-gray."""
    data_dir, tokenizer_dir, _ = dataset
    seen = next(pipeline.make_eval_batches(data_dir, tokenizer_dir, CFG, split=None))
    blind = next(pipeline.make_eval_batches(data_dir, tokenizer_dir, dataclasses.replace(CFG, blind_images=True),
                                            split=None))
    for key in ("prompt_ids", "image_grid_thw", "answer_ids"):
        np.testing.assert_array_equal(seen[key], blind[key])
    assert seen["pixel_patches"].shape == blind["pixel_patches"].shape
    assert np.abs(seen["pixel_patches"]).max() > 0 and np.abs(blind["pixel_patches"]).max() == 0


def test_the_roi_arrays_load_once_however_many_threads_read_the_first_items(dataset, monkeypatch):
    """grain reads items from several threads; the lazy np.load of the ROI arrays happens once, under a lock
    (np.load parses headers with ast.literal_eval, which CPython 3.11.7 cannot run in two threads at once), and the
    source still pickles for worker processes (without its arrays or its lock)."""
    import pickle
    import threading
    import time

    from vital_jax.data import records as records_lib

    data_dir, _, written = dataset
    calls = []
    real = records_lib.load_roi_arrays

    def slow_load(path):
        calls.append(threading.get_ident())
        time.sleep(0.05)  # wide enough a window for every thread to arrive while the first one loads
        return real(path)

    monkeypatch.setattr(pipeline, "load_roi_arrays", slow_load)
    source = pipeline.RecordDataSource(data_dir, [(i, r, True) for i, r in enumerate(written)])
    items, start = {}, threading.Barrier(8)

    def read(i):
        start.wait()
        items[i] = source[i % len(written)]

    threads = [threading.Thread(target=read, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(items) == 8
    roi = real(data_dir)["features"]
    for i, item in items.items():
        np.testing.assert_array_equal(item["roi_feature"], roi[written[i % len(written)].roi_index])
    copy = pickle.loads(pickle.dumps(source))
    assert copy._roi_features is None and copy[0]["record_index"] == 0 and len(calls) == 2


def test_prompt_widths_are_the_widths_the_records_batches_get(dataset):
    """Each record alone in a batch takes its own width, so the widths of batch-1 batches are the exact set; a
    bucket too small for a record is an error naming it."""
    data_dir, tokenizer_dir, _ = dataset
    cfg = dataclasses.replace(CFG, batch_size=1, prompt_buckets=(28, 30, 32, 40, 128))
    for split, k_min, k_max in (("train", 1, 1), ("train", 1, 4), ("train", 2, 3), ("test", 1, 4)):
        batches = pipeline.make_train_iterator(data_dir, tokenizer_dir, cfg, k_max=k_max, split=split, k_min=k_min,
                                               num_epochs=1, process_index=0, process_count=1)
        seen = sorted({b["prompt_ids"].shape[1] for b in batches})
        assert pipeline.prompt_widths(data_dir, tokenizer_dir, cfg, split, k_max, k_min) == seen, (split, k_max)
    assert len(pipeline.prompt_widths(data_dir, tokenizer_dir, cfg, "train", 4)) >= 2  # the test can fail
    with pytest.raises(pipeline.PipelineError, match=r"records.jsonl row \d+: prompt of \d+ tokens"):
        pipeline.prompt_widths(data_dir, tokenizer_dir, dataclasses.replace(cfg, prompt_buckets=(29,)), "train", 4)
