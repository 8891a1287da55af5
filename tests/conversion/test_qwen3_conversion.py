"""HF <-> Flax conversion of Qwen3 through the CLIs, as a user runs them; error reporting on bad input."""

import json
import os
import shutil
import stat
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from conversion import flax_to_hf, hf_to_flax
from tests.hf_reference import save_tiny_qwen3
from vital_jax.models import model_dir, safetensors_io
from vital_jax.models.hf_config import ConfigError
from vital_jax.models.hf_mapping import ConversionError
from vital_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from vital_jax.models.qwen3.params import abstract_params

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _all_tensors(path):
    return {name: np.asarray(array) for name, array in safetensors_io.iter_tensors(path)}


@pytest.mark.parametrize("tied", [True, False])
def test_cli_round_trip_is_tensor_identical_and_loads_in_transformers(tmp_path, tied):
    from transformers import Qwen3ForCausalLM as HFQwen3

    hf_dir, flax_dir, out_dir = tmp_path / "hf", tmp_path / "flax", tmp_path / "export"
    hf_model = save_tiny_qwen3(str(hf_dir), seed=11, tie_word_embeddings=tied)
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=REPO)
    res = run("conversion.hf_to_flax", f"--hf_dir={hf_dir}", f"--out={flax_dir}")
    assert res.returncode == 0, res.stderr
    res = run("conversion.flax_to_hf", f"--checkpoint={flax_dir}", f"--out={out_dir}")
    assert res.returncode == 0, res.stderr

    before, after = _all_tensors(str(hf_dir)), _all_tensors(str(out_dir))
    assert sorted(before) == sorted(after)
    assert ("lm_head.weight" in after) == (not tied)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)

    reloaded = HFQwen3.from_pretrained(str(out_dir), attn_implementation="eager").eval()
    ids = torch.tensor(np.random.RandomState(0).randint(0, 128, (1, 8)))
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(ids).logits.numpy(), hf_model(ids).logits.numpy(), atol=1e-6)

    # The converted directory runs in Flax with the same logits.
    config = Qwen3Config.from_pretrained(str(flax_dir))
    params = model_dir.load_params(str(flax_dir), abstract_params(config))
    ours = Qwen3ForCausalLM(config).apply({"params": params}, input_ids=jnp.asarray(ids.numpy()))
    with torch.no_grad():
        assert np.max(np.abs(np.asarray(ours.logits) - hf_model(ids).logits.numpy())) <= 1e-4


def test_sharded_checkpoint_converts_and_bf16_export(tmp_path):
    hf_dir = tmp_path / "hf"
    save_tiny_qwen3(str(hf_dir), seed=12, tie_word_embeddings=False)
    tensors = _all_tensors(str(hf_dir))
    sharded = tmp_path / "sharded"
    shutil.copytree(hf_dir, sharded)
    os.remove(sharded / "model.safetensors")
    specs = [safetensors_io.TensorSpec(n, a.shape, a.dtype, lambda a=a: a) for n, a in sorted(tensors.items())]
    files = safetensors_io.write_safetensors(str(sharded), specs, max_shard_bytes=40_000)
    assert len(files) > 2 and os.path.exists(sharded / safetensors_io.INDEX_FILE)
    # Readable by other users (a serving account), as the index and config beside them: safetensors writes 0600.
    for name in files + [safetensors_io.INDEX_FILE]:
        assert stat.S_IMODE(os.stat(sharded / name).st_mode) == 0o644, name

    summary = hf_to_flax.convert(str(sharded), str(tmp_path / "flax"), "bfloat16")
    assert summary["family"] == "qwen3"
    flax_to_hf.export(str(tmp_path / "flax"), str(tmp_path / "out"), dtype="bfloat16")
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "model.safetensors").st_mode) == 0o644
    exported = _all_tensors(str(tmp_path / "out"))
    for name, array in tensors.items():
        assert exported[name].dtype.name == "bfloat16"
        # bf16 keeps 8 significant bits: relative rounding error <= 2^-8.
        np.testing.assert_allclose(exported[name].astype(np.float32), array, rtol=2**-8, atol=1e-30)
    from transformers import Qwen3ForCausalLM as HFQwen3
    HFQwen3.from_pretrained(str(tmp_path / "out"))


def test_directory_without_safetensors_is_named(tmp_path):
    save_tiny_qwen3(str(tmp_path / "hf"))
    os.remove(tmp_path / "hf" / "model.safetensors")
    with pytest.raises(safetensors_io.SafetensorsError, match=r"hf: no model.safetensors"):
        hf_to_flax.convert(str(tmp_path / "hf"), str(tmp_path / "out"))
    res = subprocess.run([sys.executable, "-m", "conversion.hf_to_flax", f"--hf_dir={tmp_path / 'hf'}",
                          f"--out={tmp_path / 'out'}"], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 1 and "no model.safetensors" in res.stderr


def test_config_of_another_architecture_is_rejected(tmp_path):
    save_tiny_qwen3(str(tmp_path / "hf"))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="model_type 'llama' is not supported"):
        hf_to_flax.convert(str(tmp_path / "hf"), str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        Qwen3Config.from_pretrained(str(tmp_path / "hf"))


def test_wrong_shaped_unknown_and_missing_tensors_are_reported_together(tmp_path):
    hf_dir = tmp_path / "hf"
    save_tiny_qwen3(str(hf_dir), tie_word_embeddings=False)
    tensors = load_file(str(hf_dir / "model.safetensors"))
    tensors["model.layers.1.self_attn.q_proj.weight"] = tensors["model.layers.1.self_attn.q_proj.weight"][:, :10]
    tensors["model.layers.0.self_attn.rotary_extra.weight"] = np.zeros(3, np.float32)
    del tensors["model.norm.weight"]
    save_file(tensors, str(hf_dir / "model.safetensors"))
    with pytest.raises(ConversionError) as err:
        hf_to_flax.convert(str(hf_dir), str(tmp_path / "out"))
    message = str(err.value)
    assert "model.layers.1.self_attn.q_proj.weight" in message and "shape (128, 10)" in message
    assert "unknown tensor model.layers.0.self_attn.rotary_extra.weight" in message
    assert "missing tensor model.norm.weight" in message
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_other_shapes_is_rejected(tmp_path):
    save_tiny_qwen3(str(tmp_path / "hf"))
    hf_to_flax.convert(str(tmp_path / "hf"), str(tmp_path / "flax"))
    other = Qwen3Config.from_pretrained(str(tmp_path / "flax"))
    import dataclasses
    other = dataclasses.replace(other, intermediate_size=100)
    with pytest.raises(model_dir.ModelDirError, match="mlp/up_proj/kernel: saved"):
        model_dir.load_params(str(tmp_path / "flax"), abstract_params(other))
    with pytest.raises(model_dir.ModelDirError, match="not a vital_jax converted-model directory"):
        model_dir.load_params(str(tmp_path / "hf"), abstract_params(other))


def test_cli_help_describes_the_tools():
    for module in ("conversion.hf_to_flax", "conversion.flax_to_hf"):
        res = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO)
        assert res.returncode == 0 and "--out" in res.stdout and "HuggingFace" in res.stdout
    for module in ("conversion.vital_export", "conversion.medsynapse_export"):  # library modules: say where to go
        res = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, cwd=REPO)
        assert res.returncode == 1 and "python -m conversion.flax_to_hf" in res.stderr, res.stderr
    for module, pointer in (("conversion.torch_decoding", "python -m conversion.torch_latent_generate"),
                            ("conversion.torch_medsynapse_generate", "medsynapse_generate(")):
        res = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, cwd=REPO)
        assert res.returncode == 1 and "is a library module" in res.stderr and pointer in res.stderr, res.stderr


def test_a_malformed_run_or_export_json_is_named(tmp_path):
    from conversion import torch_latent_generate, vital_export
    from vital_jax.checkpoint import CheckpointError

    (tmp_path / "config.json").write_text('{"vital": ')
    (tmp_path / "vital.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json: malformed JSON"):
        vital_export.is_training_workdir(str(tmp_path))
    with pytest.raises(ValueError, match=r"vital\.json: not a JSON object"):
        torch_latent_generate._vital_json(str(tmp_path))


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("hidden_size"), "missing field 'hidden_size'"),
    (lambda c: c.update(model_type="qwen3_vl"), "missing field 'text_config'"),   # another architecture's type
    (lambda c: c.update(num_hidden_layers="two"), "num_hidden_layers='two' is not an integer"),
    (lambda c: c.update(rms_norm_eps="small"), "rms_norm_eps='small' is not a number"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6}), "unsupported rope_type 'yarn'"),
    (lambda c: c.update(num_key_value_heads=3), "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
])
def test_a_config_json_with_a_missing_or_mistyped_field_is_named(tmp_path, change, message):
    save_tiny_qwen3(str(tmp_path / "hf"))
    path = tmp_path / "hf" / "config.json"
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=f"{path}: {message}"):
        hf_to_flax.convert(str(tmp_path / "hf"), str(tmp_path / "out"))
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=f"{path}: expected a JSON object, got list"):
        hf_to_flax.convert(str(tmp_path / "hf"), str(tmp_path / "out"))


def test_a_truncated_safetensors_file_is_named(tmp_path):
    save_tiny_qwen3(str(tmp_path / "hf"))
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(safetensors_io.SafetensorsError, match=f"{weights}: not a readable safetensors file"):
        hf_to_flax.convert(str(tmp_path / "hf"), str(tmp_path / "out"))
    weights.write_bytes(b"")
    with pytest.raises(safetensors_io.SafetensorsError, match=f"{weights}: not a readable safetensors file"):
        hf_to_flax.convert(str(tmp_path / "hf"), str(tmp_path / "out"))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/model.safetensors", "/tmp/model.safetensors", 7])
def test_a_sharded_index_names_files_beside_it_only(tmp_path, shard):
    """An index whose weight_map points elsewhere (a path, a parent directory, not a string) is refused: shards
    live beside their index, and reading a path would read whatever file it names."""
    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    (model_dir / safetensors_io.INDEX_FILE).write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(safetensors_io.SafetensorsError, match=f"{model_dir / safetensors_io.INDEX_FILE}: "):
        safetensors_io.index_tensors(str(model_dir))


def test_shards_must_hold_each_tensor_once_and_where_the_index_says(tmp_path):
    """A tensor in two shards (which copy loads would depend on the reading order) or in another shard than the
    index names is refused, naming the files; a consistent index reads."""
    from safetensors.numpy import save_file

    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    a, b = np.zeros((2, 2), np.float32), np.ones((3,), np.float32)
    save_file({"w": a}, str(model_dir / "s1.safetensors"))
    save_file({"v": b}, str(model_dir / "s2.safetensors"))
    index = model_dir / safetensors_io.INDEX_FILE
    index.write_text(json.dumps({"weight_map": {"w": "s1.safetensors", "v": "s2.safetensors"}}))
    assert {k: r.shape for k, r in safetensors_io.index_tensors(str(model_dir)).items()} == {"w": (2, 2), "v": (3,)}
    index.write_text(json.dumps({"weight_map": {"w": "s2.safetensors", "v": "s1.safetensors"}}))
    with pytest.raises(safetensors_io.SafetensorsError, match=r"2 tensor\(s\) not where the index says: v \(index: "
                                                              r"s1.safetensors, found: s2.safetensors\)"):
        safetensors_io.index_tensors(str(model_dir))
    save_file({"v": b, "w": a}, str(model_dir / "s2.safetensors"))
    index.write_text(json.dumps({"weight_map": {"w": "s1.safetensors", "v": "s2.safetensors"}}))
    with pytest.raises(safetensors_io.SafetensorsError, match=r"s2.safetensors: tensor w is also in .*s1.safetensors"):
        safetensors_io.index_tensors(str(model_dir))


def test_an_export_never_mixes_with_earlier_weights_or_writes_into_its_source(tmp_path):
    """A second export into a folder with weights (a sharded index beside a single file would make transformers
    and vital_jax load different tensors) and an export or conversion into its own source are refused before
    anything is written."""
    hf_dir, flax_dir, out = tmp_path / "hf", tmp_path / "flax", tmp_path / "out"
    save_tiny_qwen3(str(hf_dir), tie_word_embeddings=False)
    with pytest.raises(model_dir.ModelDirError, match="would write into its own source"):
        hf_to_flax.convert(str(hf_dir), str(hf_dir))
    assert not (hf_dir / model_dir.PARAMS_DIR).exists()
    hf_to_flax.convert(str(hf_dir), str(flax_dir))
    files = flax_to_hf.export(str(flax_dir), str(out), max_shard_gb=20_000 / 2**30)
    assert len(files) > 1
    before = sorted(os.listdir(out))
    with pytest.raises(safetensors_io.SafetensorsError, match=f"{out}: already holds weights"):
        flax_to_hf.export(str(flax_dir), str(out), dtype="bfloat16")
    assert sorted(os.listdir(out)) == before
    with pytest.raises(safetensors_io.SafetensorsError, match="would overwrite its own source"):
        flax_to_hf.export(str(flax_dir), str(flax_dir))
    other = tmp_path / "other"   # another converted model: its config.json and record were replaced / removed
    save_tiny_qwen3(str(tmp_path / "hf_other"), seed=3)
    hf_to_flax.convert(str(tmp_path / "hf_other"), str(other))
    before = {name: (other / name).read_bytes() for name in os.listdir(other) if (other / name).is_file()}
    with pytest.raises(safetensors_io.SafetensorsError, match=f"{other}: holds a converted model"):
        flax_to_hf.export(str(flax_dir), str(other))
    assert {name: (other / name).read_bytes() for name in os.listdir(other) if (other / name).is_file()} == before


def test_a_damaged_converted_directory_is_named(tmp_path):
    hf_dir, flax_dir = tmp_path / "hf", tmp_path / "flax"
    save_tiny_qwen3(str(hf_dir))
    hf_to_flax.convert(str(hf_dir), str(flax_dir))
    config = Qwen3Config.from_pretrained(str(flax_dir))
    meta = flax_dir / model_dir.META_FILE
    record = meta.read_text()
    meta.write_text('{"format": ')
    with pytest.raises(model_dir.ModelDirError, match=f"{meta}: malformed JSON"):
        model_dir.load_params(str(flax_dir), abstract_params(config))
    meta.unlink()   # a conversion interrupted before its record
    with pytest.raises(model_dir.ModelDirError, match="an unfinished conversion"):
        model_dir.load_params(str(flax_dir), abstract_params(config))
    meta.write_text(record)
    params = flax_dir / model_dir.PARAMS_DIR
    data = [os.path.join(root, name) for root, _, names in os.walk(params) for name in names
            if os.path.getsize(os.path.join(root, name)) > 1000 and "metadata" not in name]
    assert data
    for path in data:   # the arrays' data files, truncated
        with open(path, "r+b") as f:
            f.truncate(100)
    with pytest.raises(model_dir.ModelDirError, match=f"{params}"):
        model_dir.load_params(str(flax_dir), abstract_params(config))
    shutil.rmtree(params)
    with pytest.raises(model_dir.ModelDirError, match=f"{params}: missing"):
        model_dir.load_params(str(flax_dir), abstract_params(config))


def test_an_out_that_is_a_file_or_below_one_is_one_error_line(tmp_path):
    hf_dir, flax_dir, blocker = tmp_path / "hf", tmp_path / "flax", tmp_path / "a_file"
    save_tiny_qwen3(str(hf_dir))
    hf_to_flax.convert(str(hf_dir), str(flax_dir))
    blocker.write_text("keep me")
    for out, code in ((blocker, 2), (blocker / "sub", 1)):
        for args in (("conversion.hf_to_flax", f"--hf_dir={hf_dir}"),
                     ("conversion.flax_to_hf", f"--checkpoint={flax_dir}")):
            res = subprocess.run([sys.executable, "-m", *args, f"--out={out}"], capture_output=True, text=True,
                                 cwd=REPO)
            assert res.returncode == code, res.stderr
            assert "Traceback" not in res.stderr and res.stderr.startswith("error: ") and str(blocker) in res.stderr
    assert blocker.read_text() == "keep me"


def test_the_conversion_record_is_written_after_the_side_files(tmp_path, monkeypatch):
    """vital_jax.json marks a finished conversion: a copy of the tokenizer files that fails (a kill) leaves a
    directory read as unfinished, and a converted source's own record never replaces the new one."""
    hf_dir, flax_dir = tmp_path / "hf", tmp_path / "flax"
    save_tiny_qwen3(str(hf_dir))
    (hf_dir / "tokenizer.json").write_text("{}")
    hf_to_flax.convert(str(hf_dir), str(flax_dir))
    summary = hf_to_flax.convert(str(flax_dir), str(tmp_path / "bf16"), "bfloat16")
    assert "tokenizer.json" in summary["copied_files"]
    assert model_dir.read_meta(str(tmp_path / "bf16"))["param_dtype"] == "bfloat16"

    def interrupted(src, dst, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(shutil, "copy2", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hf_to_flax.convert(str(hf_dir), str(tmp_path / "killed"))
    assert not model_dir.is_converted(str(tmp_path / "killed"))


def test_a_conversion_never_writes_over_another_checkpoint(tmp_path):
    """An --out holding a HF checkpoint (weights, or only its config.json) is refused before anything is written:
    the conversion would replace its config.json, and its record would make loaders read the new params instead
    of the weights beside them. The same config.json alone (a conversion killed before its params) is rerun."""
    source, other = tmp_path / "source", tmp_path / "other"
    save_tiny_qwen3(str(source), seed=1, tie_word_embeddings=True)
    save_tiny_qwen3(str(other), seed=2, tie_word_embeddings=False)
    before = {name: (other / name).read_bytes() for name in os.listdir(other)}
    with pytest.raises(model_dir.ModelDirError, match=f"{other}: holds weights \\(model.safetensors\\)"):
        hf_to_flax.convert(str(source), str(other))
    (other / "model.safetensors").unlink()
    with pytest.raises(model_dir.ModelDirError, match=f"{other / 'config.json'}: the config of another model"):
        hf_to_flax.convert(str(source), str(other))
    assert {name: (other / name).read_bytes() for name in os.listdir(other)} == {
        k: v for k, v in before.items() if k != "model.safetensors"}
    rerun = tmp_path / "rerun"
    rerun.mkdir()
    shutil.copy(source / "config.json", rerun / "config.json")
    hf_to_flax.convert(str(source), str(rerun))
    assert model_dir.is_converted(str(rerun))


def test_an_interrupted_sharded_export_is_redone_and_a_finished_one_still_refused(tmp_path, monkeypatch):
    """A kill mid-shard left shards and a `.tmp` file, and the rerun into the same --out was refused as "already
    holds weights". The rerun now redoes the export (no mix of the two runs' shards, no `.tmp` left, a file of the
    user's kept); a finished export and another checkpoint are refused as before."""
    hf_dir, flax_dir, out = tmp_path / "hf", tmp_path / "flax", tmp_path / "out"
    save_tiny_qwen3(str(hf_dir), tie_word_embeddings=False)
    hf_to_flax.convert(str(hf_dir), str(flax_dir))
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    write_file, written = safetensors_io._write_file, []

    def killed_in_second_shard(path, specs, metadata):
        if written:
            with open(path + ".tmp", "wb") as f:   # what a kill mid-write leaves: a partial temporary file
                f.write(b"partial")
            raise KeyboardInterrupt
        written.append(path)
        write_file(path, specs, metadata)
    monkeypatch.setattr(safetensors_io, "_write_file", killed_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        flax_to_hf.export(str(flax_dir), str(out), max_shard_gb=20_000 / 2**30)
    assert len(written) == 1 and any(name.endswith(".tmp") for name in os.listdir(out))
    monkeypatch.setattr(safetensors_io, "_write_file", write_file)

    # Rerun through the CLI, with other settings: a single file this time, whose loaders must not see old shards.
    assert flax_to_hf.main([f"--checkpoint={flax_dir}", f"--out={out}", "--dtype=bfloat16"]) == 0
    clean = tmp_path / "clean"   # the same export into a new directory
    flax_to_hf.export(str(flax_dir), str(clean), dtype="bfloat16")
    assert sorted(os.listdir(out)) == sorted(os.listdir(clean) + ["notes.txt"])
    assert "model.safetensors" in os.listdir(out) and (out / "notes.txt").read_text() == "keep me"
    for name in os.listdir(clean):
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name

    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    with pytest.raises(safetensors_io.SafetensorsError, match=f"{out}: already holds weights"):
        flax_to_hf.export(str(flax_dir), str(out))
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    with pytest.raises(safetensors_io.SafetensorsError, match=f"{hf_dir}: already holds weights"):
        flax_to_hf.export(str(flax_dir), str(hf_dir))


def test_each_written_shard_is_on_disk_before_its_name_and_the_index(tmp_path, monkeypatch):
    """Shards were renamed into place unsynced: after a power loss an export's names could point at empty files."""
    synced, order = set(), []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        real_fsync(fd)
        synced.add(os.fstat(fd).st_ino)

    def replace(src, dst):
        order.append((os.path.basename(dst), os.stat(src).st_ino in synced))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    specs = [safetensors_io.TensorSpec(f"w{i}", (256,), np.float32, lambda i=i: np.full((256,), i, np.float32))
             for i in range(3)]
    names = safetensors_io.write_safetensors(str(tmp_path / "out"), specs, max_shard_bytes=1024)
    assert len(names) == 3 and [name for name, _ in order][-1] == safetensors_io.INDEX_FILE
    assert all(was_synced for _, was_synced in order), order
    assert _all_tensors(str(tmp_path / "out"))["w2"].tolist() == [2.0] * 256


@pytest.mark.parametrize("family", ["qwen3", "qwen3_vl"])
def test_fields_a_config_omits_take_transformers_defaults(tmp_path, family):
    """rope_theta and head_dim missing from config.json: vital_jax read 1e6 and hidden / heads, transformers 1e4
    (Qwen3) or 5e5 (Qwen3-VL's text decoder) and 128, so the two built different models from one file."""
    from transformers import AutoConfig

    from tests.hf_reference import save_tiny_qwen3_vl
    from vital_jax.models.qwen3_vl import Qwen3VLConfig

    if family == "qwen3":
        save_tiny_qwen3(str(tmp_path), head_dim=128)
    else:
        save_tiny_qwen3_vl(str(tmp_path), text=dict(head_dim=128, rope_parameters={
            "rope_type": "default", "rope_theta": 1e6, "mrope_section": [32, 16, 16], "mrope_interleaved": True}))
    cfg = json.loads((tmp_path / "config.json").read_text())
    text = cfg if family == "qwen3" else cfg["text_config"]
    for key in ("rope_theta", "head_dim"):
        text.pop(key, None)
    rope = text.get("rope_parameters") or {}
    rope.pop("rope_theta", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    theirs = AutoConfig.from_pretrained(str(tmp_path))
    theirs = theirs if family == "qwen3" else theirs.text_config
    ours = Qwen3Config.from_pretrained(str(tmp_path)) if family == "qwen3" else (
        Qwen3VLConfig.from_pretrained(str(tmp_path)).text)
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] and ours.head_dim == theirs.head_dim == 128
