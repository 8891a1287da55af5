"""Inference without the encoder (§2.4): the deployed model is backbone (+ LoRA) + A_psi. Its parameter tree and its
compiled program hold no E_ana / P_phi weights; its HF export round-trips and a PyTorch reference of its generation
(transformers Qwen3-VL + a torch A_psi) matches the JAX generation token for token."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.medsynapse.medsynapse_fixtures import IM_END, IMG, VE, VS, build_backbone
from vital_jax.generation import SamplingConfig
from vital_jax.layers.linear import LoraConfig
from vital_jax.medsynapse import autonomous as autonomous_lib
from vital_jax.medsynapse import deploy
from vital_jax.medsynapse import memory as memory_lib
from vital_jax.medsynapse.autonomous import AutonomousConfig, AutonomousMemory
from vital_jax.medsynapse.sampler import DiagnosticMemorySampler, SamplerConfig
from vital_jax.models.hf_mapping import flatten, unflatten
from vital_jax.models.qwen3_vl import Qwen3VLForConditionalGeneration, load_params
from vital_jax.models.qwen3_vl import params as qwen3_vl_params
from vital_jax.models.qwen3_vl.cached import prefix_inputs

SAMPLING = SamplingConfig(max_new_tokens=8, eos_token_ids=(IM_END,))
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q", "k", "v", "o"))
# Row 0 holds two images of different sizes, row 1 one image: A_psi pools each row's images together.
ROW_GRIDS = (((1, 4, 4), (1, 4, 6)), ((1, 6, 4),))


def _multi_image_batch(config, seed=0):
    rng = np.random.RandomState(seed)
    rows = []
    for i, grids in enumerate(ROW_GRIDS):
        row = list(rng.randint(0, 180, 2 + i))
        for t, h, w in grids:
            row += [VS] + [IMG] * (t * h * w // 4) + [VE] + list(rng.randint(0, 180, 2))
        rows.append(row)
    b, tp = len(rows), max(len(r) for r in rows)
    ids, valid = np.zeros((b, tp), np.int32), np.zeros((b, tp), bool)
    for i, r in enumerate(rows):
        ids[i, tp - len(r):], valid[i, tp - len(r):] = r, True
    grids = np.asarray([g for row in ROW_GRIDS for g in row], np.int32)
    pixels = rng.randn(int(np.prod(grids, axis=1).sum()), config.vision.patch_dim).astype(np.float32)
    return dict(ids=ids, valid=valid, grids=grids, pixels=pixels,
                prefix=prefix_inputs(ids, valid, grids, pixels, config))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("deploy_backbone")
    tiny = build_backbone(path)
    d = tiny.config.text.hidden_size
    autonomous = AutonomousMemory(AutonomousConfig(hidden_size=d, num_queries=3, mlp_hidden=40, output_rms=0.5))
    sampler = DiagnosticMemorySampler(SamplerConfig(hidden_size=d, num_queries=3, num_heads=4))
    features = jnp.asarray(np.random.RandomState(1).randn(2, 3, 4, 16).astype(np.float32))
    # Stage II's backbone: the base weights plus non-zero LoRA adapters on the attention projections.
    rng = np.random.RandomState(2)
    base = flatten(tiny.params)
    with_lora = {p: base[p] if p in base else (0.3 * rng.randn(*s.shape)).astype(np.float32)
                 for p, s in flatten(qwen3_vl_params.abstract_params(tiny.config, LORA)).items()}
    assert any("lora_b" in p for p in with_lora)
    psi = autonomous.init(jax.random.PRNGKey(1), jnp.zeros((1, 2, d)), jnp.ones((1, 2), bool))["params"]
    # A trained A_psi's slot offsets are not the init's zeros: an export or a reference that dropped them must fail.
    psi = {**psi, "slot_bias": jnp.asarray(0.5 * rng.randn(3, d).astype(np.float32))}
    stage3 = {"backbone": unflatten(with_lora),
              "sampler": sampler.init(jax.random.PRNGKey(0), features)["params"], "autonomous": psi}
    return dict(path=path, tiny=tiny, autonomous=autonomous, sampler=sampler, features=features, stage3=stage3,
                lora_model=Qwen3VLForConditionalGeneration(tiny.config, LORA),
                batch=_multi_image_batch(tiny.config))


def test_deployable_params_hold_only_the_backbone_and_a_psi(setup):
    stage3 = {**setup["stage3"], "encoder": {"patch_embed": {"kernel": jnp.zeros((4, 4))}}}
    for lora in (None, LORA):
        params = deploy.deployable_params(stage3, lora)
        assert sorted(params) == ["autonomous", "backbone"]
        paths = list(flatten(params))
        assert not [p for p in paths if re.search(r"sampler|encoder|probes|cross_attn", p)]
        assert any("lora_" in p for p in paths) == (lora is None)
    with pytest.raises(ValueError, match="deployed params are exactly"):
        deploy.generate(setup["tiny"].model, setup["autonomous"], stage3, setup["batch"]["prefix"], SAMPLING)
    with pytest.raises(ValueError, match="missing"):
        deploy.deployable_params({"backbone": stage3["backbone"]})


_ARG = re.compile(r"%arg\d+: tensor<([^>]*)>")
_CONST = re.compile(r"stablehlo\.constant dense<[^\n]*?> : tensor<([^>]*)>")


def _tensor_bytes(spec: str) -> tuple[int, int]:
    *dims, dtype = spec.split("x")
    count = int(np.prod([int(d) for d in dims])) if dims else 1
    bits = int(re.search(r"\d+", dtype).group())  # f32, bf16, ui64, i1 (bool, one byte)
    return count, count * max(1, bits // 8)


def _program(fn, *args):
    """(bytes of the lowered program's inputs, element counts of its non-scalar constants, its jaxpr consts)."""
    text = jax.jit(fn).lower(*args).as_text()
    main = text[text.index("func.func public @main"):]
    signature = main[:main.index("{")]
    arg_bytes = sum(_tensor_bytes(s)[1] for s in _ARG.findall(signature))
    constants = [n for n in (_tensor_bytes(s)[0] for s in _CONST.findall(text)) if n > 1]
    consts = jax.make_jaxpr(fn)(*args).consts
    return arg_bytes, constants, [np.size(c) for c in consts]


def _nbytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_the_deployed_program_has_no_encoder_or_sampler_parameters(setup):
    """The jitted deployed generate takes as inputs exactly what the plain VLM's generate with N (zero) memory slots
    takes (backbone weights and the prompt) plus A_psi, and embeds no weight as a constant; the same checks flag a
    program that uses P_phi, passed as an input or closed over."""
    tiny, autonomous, sampler = setup["tiny"], setup["autonomous"], setup["sampler"]
    params = deploy.deployable_params(setup["stage3"], LORA)
    prefix, features = setup["batch"]["prefix"], setup["features"]

    def plain_vlm(backbone_params, pre):
        slots = jnp.zeros((2, autonomous.config.num_queries, tiny.config.text.hidden_size))
        return memory_lib.generate(tiny.model, backbone_params, pre, slots, SAMPLING)

    def deployed(p, pre):
        return deploy.generate(tiny.model, autonomous, p, pre, SAMPLING)

    # (jit prunes inputs the outputs do not depend on, in both programs alike: e.g. the last deepstack merger, whose
    # features are added after the last decoder layer and reach neither the cache nor the state at m_N.)
    plain_bytes, _, _ = _program(plain_vlm, params["backbone"], prefix)
    arg_bytes, constants, consts = _program(deployed, params, prefix)
    assert arg_bytes == plain_bytes + _nbytes(params["autonomous"])
    assert plain_bytes > _nbytes(params["backbone"]) // 2
    # Constants: small index tables only (MRoPE sections, iotas), all smaller than P_phi's smallest weight matrix.
    sampler_leaves = jax.tree.leaves(setup["stage3"]["sampler"])
    smallest_matrix = min(x.size for x in sampler_leaves if x.ndim >= 2)
    assert max(constants + consts, default=0) < smallest_matrix, (constants, consts)

    # Controls: the teacher branch's generation (memory from P_phi) is caught by each check.
    def with_sampler(backbone_params, sampler_params, pre, f):
        memory = sampler.apply({"params": sampler_params}, f)
        return memory_lib.generate(tiny.model, backbone_params, pre, memory, SAMPLING)

    leaky_bytes, _, _ = _program(with_sampler, params["backbone"], setup["stage3"]["sampler"], prefix, features)
    assert leaky_bytes == plain_bytes + _nbytes(setup["stage3"]["sampler"]) + _nbytes(features)
    closed = jax.tree.map(jnp.asarray, setup["stage3"]["sampler"])
    _, leaky_constants, leaky_consts = _program(lambda p, pre, f: with_sampler(p, closed, pre, f),
                                                params["backbone"], prefix, features)
    largest = max(x.size for x in sampler_leaves)
    assert max(leaky_constants) >= largest and max(leaky_consts) >= largest


def test_lora_merged_or_not_the_deployed_model_generates_the_same_answers(setup):
    tiny, autonomous, prefix = setup["tiny"], setup["autonomous"], setup["batch"]["prefix"]
    unmerged = deploy.deployable_params(setup["stage3"])
    merged = deploy.deployable_params(setup["stage3"], LORA)
    a = deploy.make_generate(setup["lora_model"], autonomous, SAMPLING)(unmerged, prefix)
    b = deploy.make_generate(tiny.model, autonomous, SAMPLING)(merged, prefix)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    base = deploy.make_generate(tiny.model, autonomous, SAMPLING)(
        {"backbone": tiny.params, "autonomous": unmerged["autonomous"]}, prefix)
    assert not np.array_equal(np.asarray(base[0]), np.asarray(a[0]))  # the adapters do change the answers


def test_an_export_without_a_psi_writes_nothing(setup, tmp_path):
    """Parameters of a run that never reached Stage III (no A_psi): refused before the backbone is written, so the
    folder is not left as a plain VLM that the next export would refuse."""
    from conversion import medsynapse_export

    out = tmp_path / "export"
    no_psi = {k: v for k, v in setup["stage3"].items() if k != "autonomous"}
    with pytest.raises(ValueError, match="not finished Stage III"):
        medsynapse_export.export_deployable(str(out), str(setup["path"]), setup["tiny"].config, no_psi,
                                            setup["autonomous"].config, lora=LORA)
    assert not out.exists()


@pytest.mark.parametrize("position,prompt_tail", [("assistant_turn", 0), ("user_turn", 2)])
def test_export_round_trips_and_torch_generation_matches_jax_token_for_token(setup, tmp_path, position, prompt_tail):
    """user_turn: the prompt's last 2 tokens (both rows end with 2 text tokens after their last image) follow the
    memory; the PyTorch reference reads that from the export."""
    from transformers import Qwen3VLForConditionalGeneration as HFQwen3VL

    from conversion import medsynapse_export
    from conversion.torch_medsynapse_generate import load_autonomous, medsynapse_generate

    tiny, autonomous, data = setup["tiny"], setup["autonomous"], setup["batch"]
    out = tmp_path / "export"
    result = medsynapse_export.export_deployable(str(out), str(setup["path"]), tiny.config, setup["stage3"],
                                                 autonomous.config, lora=LORA, memory_position=position,
                                                 prompt_tail=prompt_tail)
    assert sorted(result["files"]) == ["autonomous.safetensors", "medsynapse.json", "model.safetensors"]
    meta = json.loads((out / "medsynapse.json").read_text())
    assert meta["num_memory"] == 3 and meta["lora_merged"] is True
    assert (meta["memory_position"], meta["prompt_tail"]) == (position, prompt_tail)
    assert medsynapse_export.read_prompt_tail(str(out)) == prompt_tail
    from safetensors.numpy import load_file
    names = list(load_file(str(out / "model.safetensors"))) + list(load_file(str(out / "autonomous.safetensors")))
    assert not [n for n in names if re.search(r"sampler|encoder|probes|lora", n)]

    # JAX round trip: the export's backbone is the merged one, its A_psi the trained one.
    params = deploy.deployable_params(setup["stage3"], LORA)
    loaded_backbone = load_params(str(out), tiny.config)
    for (p, x), (q, y) in zip(sorted(flatten(params["backbone"]).items()), sorted(flatten(loaded_backbone).items())):
        assert p == q and np.array_equal(np.asarray(x), np.asarray(y)), p
    cfg, loaded_psi = medsynapse_export.load_autonomous(str(out))
    assert cfg.num_queries == 3 and cfg.mlp_width == 40
    jax.tree.map(np.testing.assert_array_equal, loaded_psi, params["autonomous"])

    tokens, lengths = deploy.make_generate(tiny.model, AutonomousMemory(cfg), SAMPLING, prompt_tail)(
        {"backbone": loaded_backbone, "autonomous": loaded_psi}, data["prefix"])
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    _, memory = autonomous_lib.autonomous_memory(tiny.model, autonomous, params, data["prefix"])

    hf = HFQwen3VL.from_pretrained(str(out), attn_implementation="eager").eval()
    torch_psi = load_autonomous(str(out))
    start = 0
    for row, grids in enumerate(ROW_GRIDS):
        n_patches = int(sum(np.prod(g) for g in grids))
        pixels = torch.tensor(data["pixels"][start:start + n_patches])
        grid = torch.tensor(np.asarray(grids, np.int64))
        start += n_patches
        ids = torch.tensor(data["ids"][row][data["valid"][row]][None].astype(np.int64))
        with torch.no_grad():
            visual = torch.cat(hf.model.get_image_features(pixels, grid).pooler_output, 0)
            assert np.max(np.abs(torch_psi(visual).numpy() - np.asarray(memory[row]))) <= 1e-5
        theirs = medsynapse_generate(hf, torch_psi, ids, pixels, grid, SAMPLING.max_new_tokens, (IM_END,))
        assert theirs == tokens[row, :lengths[row]].tolist(), row
    assert lengths.min() >= 2  # answers long enough that the decode loop is exercised


def test_the_export_command_says_whether_lora_was_merged_and_where_the_memory_goes(setup, tmp_path):
    """A run without Stage II (stages warmup, imt) was reported as exported "(LoRA merged, A_psi)"."""
    from conversion import medsynapse_export

    tiny, autonomous = setup["tiny"], setup["autonomous"]
    plain = {**setup["stage3"], "backbone": tiny.params}
    out = tmp_path / "plain"
    result = medsynapse_export.export_deployable(str(out), str(setup["path"]), tiny.config, plain,
                                                 autonomous.config, memory_position="user_turn", prompt_tail=2)
    assert result["meta"] == json.loads((out / "medsynapse.json").read_text())
    assert medsynapse_export.describe_export("RUN", result) == (
        f"exported the MedSynapse-V run RUN (no LoRA (Stage II did not run), A_psi, memory at user_turn) to {out}: "
        "model.safetensors, autonomous.safetensors, medsynapse.json")
    merged = medsynapse_export.export_deployable(str(tmp_path / "merged"), str(setup["path"]), tiny.config,
                                                 setup["stage3"], autonomous.config, lora=LORA)
    assert "(LoRA merged, A_psi, memory at assistant_turn)" in medsynapse_export.describe_export("RUN", merged)


def _autonomous_export(directory, n=3, d=8, h=5):
    """A minimal export folder for the A_psi loaders: medsynapse.json and autonomous.safetensors (no backbone)."""
    from safetensors.numpy import save_file

    directory.mkdir()
    meta = {"format": "medsynapse-v-autonomous", "version": 2, "num_memory": n, "hidden_size": d, "mlp_hidden": h,
            "layer_norm_eps": 1e-5, "activation": "gelu_erf", "pooling": "learned_query_attention",
            "image_token_id": IMG, "lora_merged": False}
    (directory / "medsynapse.json").write_text(json.dumps(meta))
    shapes = {"queries": (n, d), "norm.scale": (d,), "norm.bias": (d,), "fc1.kernel": (d, h), "fc1.bias": (h,),
              "fc2.kernel": (h, d), "fc2.bias": (d,), "slot_bias": (n, d)}
    rng = np.random.RandomState(0)
    save_file({f"autonomous.{k}": rng.randn(*s).astype(np.float32) for k, s in shapes.items()},
              str(directory / "autonomous.safetensors"))
    return directory


def _load_with(loader, export_dir):
    from conversion import medsynapse_export, torch_medsynapse_generate

    module = medsynapse_export if loader == "jax" else torch_medsynapse_generate
    return module.load_autonomous(str(export_dir))


@pytest.mark.parametrize("loader", ["jax", "torch"])
def test_autonomous_loaders_read_a_well_formed_export(loader, tmp_path):
    loaded = _load_with(loader, _autonomous_export(tmp_path / "export"))
    if loader == "jax":
        cfg, params = loaded
        assert cfg.num_queries == 3 and params["slot_bias"].shape == (3, 8)
        from conversion import medsynapse_export
        assert medsynapse_export.read_prompt_tail(str(tmp_path / "export")) == 0  # version 2: after the prompt
    else:
        assert loaded(torch.zeros(4, 8)).shape == (3, 8)


def _malformed_meta(export_dir):
    (export_dir / "medsynapse.json").write_text('{"format": "medsynapse-v-auto')
    return ValueError, "medsynapse.json: malformed JSON"


def _meta_without_eps(export_dir):
    meta = json.loads((export_dir / "medsynapse.json").read_text())
    del meta["layer_norm_eps"]
    (export_dir / "medsynapse.json").write_text(json.dumps(meta))
    return ValueError, "medsynapse.json: .*layer_norm_eps"


def _bad_prompt_tail(export_dir):
    meta = json.loads((export_dir / "medsynapse.json").read_text())
    (export_dir / "medsynapse.json").write_text(json.dumps({**meta, "version": 3, "prompt_tail": -1}))
    return ValueError, "medsynapse.json: prompt_tail is -1"


def _truncated_weights(export_dir):
    weights = export_dir / "autonomous.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    return ValueError, "autonomous.safetensors: .*incomplete metadata"


def _weights_without_slot_bias(export_dir):
    # The torch module used to load this and fail later, in the forward pass, on the missing attribute.
    from safetensors.numpy import load_file, save_file

    weights = str(export_dir / "autonomous.safetensors")
    tensors = load_file(weights)
    del tensors["autonomous.slot_bias"]
    save_file(tensors, weights)
    return ValueError, "autonomous.safetensors: .*missing slot_bias"


def _weights_not_matching_meta(export_dir):
    meta = json.loads((export_dir / "medsynapse.json").read_text())
    (export_dir / "medsynapse.json").write_text(json.dumps({**meta, "num_memory": 4}))
    return ValueError, r"autonomous.safetensors: .*queries: \(3, 8\), expected \(4, 8\)"


def _missing_weights(export_dir):
    (export_dir / "autonomous.safetensors").unlink()
    return FileNotFoundError, "autonomous.safetensors"


@pytest.mark.parametrize("loader", ["jax", "torch"])
@pytest.mark.parametrize("damage", [_malformed_meta, _meta_without_eps, _bad_prompt_tail, _truncated_weights,
                                    _weights_without_slot_bias, _weights_not_matching_meta, _missing_weights])
def test_autonomous_loaders_name_the_file_of_a_damaged_export(loader, damage, tmp_path):
    export_dir = _autonomous_export(tmp_path / "export")
    error, message = damage(export_dir)
    with pytest.raises(error, match=re.escape(f"{export_dir}/") + message):
        _load_with(loader, export_dir)
