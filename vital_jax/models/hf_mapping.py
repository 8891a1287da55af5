"""Name/layout mapping between HuggingFace safetensors and Flax parameter trees, checked against shapes.

A model family declares a list of `Rule`s in its `params.py`: a regex over HF tensor names with named groups,
the Flax path template using the same groups, and a `Transform` (with its inverse, for export). Loading checks
every tensor against the model's abstract parameter tree (from `jax.eval_shape`) and reports *all* unknown,
missing and mis-shaped tensors together, naming each one and its file.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import jax
import numpy as np

from vital_jax.models import model_dir as converted
from vital_jax.models import safetensors_io


class ConversionError(ValueError):
    """Some tensors could not be mapped; `problems` lists one line per tensor."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        lines = "\n  ".join(problems)
        super().__init__(f"{source}: {len(problems)} tensor problem(s):\n  {lines}")


@dataclass(frozen=True)
class Transform:
    """A layout change HF -> Flax and its exact inverse."""

    to_flax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform(lambda x: x, lambda x: x)
# torch Linear stores [out, in]; a Flax kernel is [in, out].
LINEAR = Transform(lambda x: x.T, lambda x: x.T)


@dataclass(frozen=True)
class Rule:
    hf: str
    flax: str
    transform: Transform = IDENTITY

    def hf_regex(self) -> re.Pattern:
        return re.compile(self.hf + r"\Z")

    def flax_regex(self) -> re.Pattern:
        pattern = re.escape(self.flax)
        pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", pattern)
        return re.compile(pattern + r"\Z")

    def hf_name(self, groups: dict[str, str]) -> str:
        """Rebuild the HF tensor name from the groups of a matched Flax path."""
        name = self.hf
        for key, value in groups.items():
            name = re.sub(r"\(\?P<%s>[^)]*\)" % key, value, name)
        return name.replace("\\.", ".")


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """Nested dict -> {'a/b/c': leaf}."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict) or (hasattr(value, "items") and not hasattr(value, "shape")):
            out.update(flatten(dict(value.items()), path))
        else:
            out[path] = value
    return out


def unflatten(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def load_hf_params(model_dir: str, rules: Iterable[Rule], abstract_params: dict, dtype,
                   ignore: Iterable[str] = (), rename: Callable[[str], str] | None = None) -> dict:
    """Read a HF checkpoint directory into a nested dict of numpy arrays shaped like `abstract_params`; a
    directory converted by `conversion.hf_to_flax` (`model_dir.is_converted`) is read from its saved Flax tree
    with the same checks (`_load_converted`), so every family's loader takes either.

    abstract_params: the Flax 'params' tree of ShapeDtypeStructs (from `jax.eval_shape`).
    ignore: regexes of HF names that may be present and are skipped (e.g. a tied `lm_head.weight`).
    rename: optional HF-name rewrite applied first (e.g. strip a `vision_model.` prefix).
    Raises ConversionError listing every unknown, missing or mis-shaped tensor.
    """
    rules = list(rules)
    if converted.is_converted(model_dir):
        return _load_converted(model_dir, rules, abstract_params, dtype, ignore)
    compiled = [(r, r.hf_regex()) for r in rules]
    ignored = [re.compile(p + r"\Z") for p in ignore]
    expected = flatten(abstract_params)
    refs = safetensors_io.index_tensors(model_dir)
    out: dict[str, np.ndarray] = {}
    problems: list[str] = []
    reported: set[str] = set()  # Flax paths already named in a problem, not to be reported again as missing
    for hf_name in sorted(refs):
        ref = refs[hf_name]
        name = rename(hf_name) if rename else hf_name
        if name is None or any(p.match(name) for p in ignored):
            continue
        match = next(((r, m) for r, rx in compiled if (m := rx.match(name))), None)
        if match is None:
            problems.append(f"unknown tensor {hf_name} {ref.shape} in {ref.path}")
            continue
        rule, m = match
        path = rule.flax.format(**m.groupdict())
        if path not in expected:
            problems.append(f"unexpected tensor {hf_name} in {ref.path}: maps to {path}, which this config lacks")
            continue
        want = tuple(expected[path].shape)
        reported.add(path)
        try:
            array = rule.transform.to_flax(safetensors_io.read_tensor(ref))
        except Exception as e:  # a layout transform on a wrong-shaped tensor
            problems.append(f"tensor {hf_name} {ref.shape} in {ref.path}: cannot convert ({e})")
            continue
        if tuple(array.shape) != want:
            problems.append(f"tensor {hf_name} in {ref.path} has shape {ref.shape}; "
                            f"expected {want} after conversion to {path} (got {tuple(array.shape)})")
            continue
        out[path] = np.asarray(array, dtype=dtype)
    missing = sorted(set(expected) - set(out) - reported)
    if missing or problems:
        reverse = [(r, r.flax_regex()) for r in rules]
        for path in missing:
            match = next(((r, m) for r, rx in reverse if (m := rx.match(path))), None)
            hf = match[0].hf_name(match[1].groupdict()) if match else "(no rule)"
            problems.append(f"missing tensor {hf} (for {path}, shape {tuple(expected[path].shape)})")
    if problems:
        raise ConversionError(model_dir, problems)
    return unflatten(out)


def _load_converted(directory: str, rules: list[Rule], abstract_params: dict, dtype, ignore: Iterable[str]) -> dict:
    """`load_hf_params` for a converted-model directory (`model_dir`): its saved Flax tree, checked like a HF one.
    Saved parameters that `abstract_params` lacks are allowed when their HF name (through `rules`) matches
    `ignore` (e.g. SigLIP's MAP head when only patch tokens are wanted); any other difference is a problem."""
    saved = flatten(converted.restore_saved(directory))
    expected = flatten(abstract_params)
    ignored = [re.compile(p + r"\Z") for p in ignore]
    reverse = [(r, r.flax_regex()) for r in rules]
    out: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for path in sorted(saved):
        shape = tuple(saved[path].shape)
        if path not in expected:
            match = next(((r, m) for r, rx in reverse if (m := rx.match(path))), None)
            if match is None or not any(p.match(match[0].hf_name(match[1].groupdict())) for p in ignored):
                problems.append(f"unexpected parameter {path} {shape}: this config lacks it")
            continue
        if shape != tuple(expected[path].shape):
            problems.append(f"parameter {path} has shape {shape}; expected {tuple(expected[path].shape)}")
            continue
        out[path] = np.asarray(saved.pop(path), dtype=dtype)
    problems += [f"missing parameter {path} {tuple(expected[path].shape)}"
                 for path in sorted(set(expected) - set(saved) - set(out))]
    if problems:
        raise ConversionError(directory, problems)
    return unflatten(out)


def to_hf_specs(params: dict, rules: Iterable[Rule], dtype,
                rename: Callable[[str], str] | None = None) -> list[safetensors_io.TensorSpec]:
    """Flax params -> TensorSpecs with HF names (tensors transformed lazily, one at a time, when written)."""
    reverse = [(r, r.flax_regex()) for r in rules]
    specs = []
    problems = []
    for path, leaf in sorted(flatten(params).items()):
        if "lora_" in path.rsplit("/", 1)[-1]:
            problems.append(f"{path}: LoRA parameters must be merged into the base weights before export")
            continue
        match = next(((r, m) for r, rx in reverse if (m := rx.match(path))), None)
        if match is None:
            problems.append(f"{path}: no HF name for this Flax parameter")
            continue
        rule, m = match
        name = rule.hf_name(m.groupdict())
        if rename:
            name = rename(name)
        # A zero-stride view: the transform's output shape without allocating the tensor.
        shape = tuple(rule.transform.to_hf(np.broadcast_to(np.zeros((), np.bool_), leaf.shape)).shape)

        def produce(leaf=leaf, rule=rule):
            return rule.transform.to_hf(np.asarray(jax.device_get(leaf)).astype(dtype))

        specs.append(safetensors_io.TensorSpec(name, shape, np.dtype(dtype), produce))
    if problems:
        raise ConversionError("export", problems)
    return specs
