"""Shape-only parameter summary of a model, read from its HF config directory (no weights read or allocated).

    python -m vital_jax.models.summary --config_dir=configs/hf/qwen3_vl_8b_instruct [--depth 2]

The family is picked from config.json's `model_type` through `vital_jax.models.registry`; its
`abstract_params(config)` builds the Flax params tree with `jax.eval_shape`, so an 8B model is summarised in
about a second on a laptop. Numbered siblings (`layers_0 ... layers_35`) are merged into one row (`layers`, 36x)
whose count is the sum over all of them, and deeper rows under a merged row sum over every member too.
A SigLIP directory (full `SiglipModel` or `SiglipVisionModel`) is summarised as its vision tower only: that is
all vital_jax builds of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Mapping

import jax
import numpy as np

from vital_jax.models import hf_config, registry

_NUMBERED = re.compile(r"^(?P<base>.+)_(?P<index>\d+)$")


@dataclasses.dataclass(frozen=True)
class Row:
    """One module of the summary. `path` is dotted with numbered siblings merged ('visual.blocks')."""

    path: str
    count: int
    repeats: int = 1  # how many numbered siblings were merged into this row (per parent instance)
    depth: int = 1


@dataclasses.dataclass(frozen=True)
class Summary:
    family: str
    config_dir: str
    total: int
    rows: tuple[Row, ...]
    tied_embeddings: bool = False

    def count(self, path: str) -> int:
        """Parameter count of the row at `path` (e.g. 'language_model.embed_tokens'); KeyError if absent."""
        for row in self.rows:
            if row.path == path:
                return row.count
        raise KeyError(f"{path!r} not in summary of {self.config_dir}; rows: {[r.path for r in self.rows]}")


def count_params(tree) -> int:
    """Number of scalars in a params tree of arrays or ShapeDtypeStructs."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def abstract_params_for(config_dir: str) -> tuple[str, dict, dict]:
    """(family name, abstract params tree, HF config dict) for the config.json in `config_dir`."""
    cfg = hf_config.read_config_json(config_dir)
    source = os.path.join(config_dir, "config.json")
    family = registry.family_for(cfg, source)
    config = family.config_from_hf(cfg, source)
    return family.name, family.abstract_params(config), cfg


def module_rows(params: Mapping, depth: int = 2) -> list[Row]:
    """Rows for every module (sub-dict) down to `depth` levels, parents before children, siblings merged."""
    rows: list[Row] = []
    _collect([params], "", 1, depth, rows)
    return rows


def _collect(nodes: list[Mapping], prefix: str, level: int, depth: int, rows: list[Row]) -> None:
    # `nodes` are the same logical module in each merged sibling, e.g. every decoder layer's `mlp`.
    groups: dict[str, list] = {}
    for node in nodes:
        for name, child in node.items():
            match = _NUMBERED.match(name)
            groups.setdefault(match["base"] if match else name, []).append(child)
    for base, children in groups.items():
        if not all(isinstance(child, Mapping) for child in children):
            continue  # a parameter array, not a module
        path = f"{prefix}{base}"
        rows.append(Row(path, sum(count_params(c) for c in children), len(children) // len(nodes), level))
        if level < depth:
            _collect(children, f"{path}.", level + 1, depth, rows)


def summarize(config_dir: str, depth: int = 2) -> Summary:
    """Summary of the model described by `config_dir/config.json`, down to `depth` module levels."""
    family, params, cfg = abstract_params_for(config_dir)
    tied = bool(cfg.get("tie_word_embeddings", False)) and family != "siglip"
    return Summary(family, config_dir, count_params(params), tuple(module_rows(params, depth)), tied)


def format_summary(summary: Summary) -> str:
    """A plain-text table: module, parameters in millions (one decimal), exact count, repeat factor."""
    width = max([len("  " * (r.depth - 1) + r.path) for r in summary.rows] + [len("total")])
    lines = [f"{summary.family}  ({summary.config_dir})",
             f"{'module':<{width}}  {'params':>11}  {'count':>15}"]
    for row in summary.rows:
        name = "  " * (row.depth - 1) + row.path
        repeat = f"  {row.repeats}x" if row.repeats > 1 else ""
        lines.append(f"{name:<{width}}  {row.count / 1e6:>10,.1f}M  {row.count:>15,}{repeat}")
    lines.append(f"{'total':<{width}}  {summary.total / 1e6:>10,.1f}M  {summary.total:>15,}")
    if summary.tied_embeddings:
        lines.append("tie_word_embeddings: the output projection reuses embed_tokens (counted once)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vital_jax.models.summary",
        description="Print parameter counts per module of a model from its HF config directory (shapes only).")
    parser.add_argument("--config_dir", required=True, help="directory holding a HF config.json")
    parser.add_argument("--depth", type=int, default=2, help="module levels to show (default 2)")
    args = parser.parse_args(argv)
    if args.depth < 1:
        parser.error("--depth must be >= 1")
    try:
        summary = summarize(args.config_dir, args.depth)
    except hf_config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
