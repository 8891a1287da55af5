"""What the memory costs or brings the frozen backbone: a diagnostic of Stage I (Eq. 2).

    python -m vital_jax.medsynapse.memory_cost --workdir=<MedSynapse-V run> [--split=val] [--limit=N]

Stage I's own baseline, the same run at lr = 0, still writes N vectors into a prompt the backbone never saw
vectors in; the model the memory has to improve on is the backbone answering from the prompt alone. This reads
the run's Stage I (its frozen base backbone and trained P_phi) and scores the reference answers of `split`,
teacher forced, under five memories written where the run writes its memory (`medsynapse.memory_position`):

  no_memory         the prompt alone (N = 0): the backbone as Stage I received it
  zero_memory       N zero vectors
  text_memory       the token embeddings of N tokens of plain text (TEXT_MEMORY, cycled to N): what writing N
                    tokens the backbone knows costs there, the reference for what a memory could cost at least
  initial_sampler   P_phi(F) with P_phi as Stage I initialises it (the run's seed)
  trained_sampler   P_phi(F) with the P_phi Stage I trained

For each: the answer NLL summed per example (Eq. 2's "sum" reduction; nats), per answer token, and of the first
answer token alone (where a closed answer's "yes" / "no" is decided). A memory that carries something the
backbone can use brings the NLL below no_memory. F comes from the run's stored feature maps (`features`), the
batches from the shared pipeline, the NLL from `memory.answer_log_probs` (Stage I's own scorer). Results:
printed, and written to `<workdir>/memory_cost_<split>.json` (or --out).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from vital_jax import cli, sharding
from vital_jax.data.pipeline import make_eval_batches
from vital_jax.jsonio import atomic_write
from vital_jax.medsynapse import memory as memory_lib
from vital_jax.medsynapse import trainer
from vital_jax.models.qwen3_vl import prompt

CONDITIONS = ("no_memory", "zero_memory", "text_memory", "initial_sampler", "trained_sampler")
# text_memory's tokens: an instruction-like sentence that asks for nothing the answer does not already need.
TEXT_MEMORY = "Look at the image carefully and answer the question about the scan shown here."


@dataclasses.dataclass
class _Totals:
    nll: float = 0.0
    tokens: int = 0
    first_nll: float = 0.0
    examples: int = 0

    def summary(self) -> dict:
        n = max(self.examples, 1)
        return {"nll_per_example": self.nll / n, "nll_per_token": self.nll / max(self.tokens, 1),
                "first_token_nll": self.first_nll / n}


def memory_cost(workdir: str, split: str = "val", limit: int | None = None) -> dict:
    """The conditions' (CONDITIONS) answer NLL over `split` (at most `limit` examples) for the run in `workdir`.

    Returns {"workdir", "split", "examples", "memory_position", "num_memory", "conditions": {name: {
    "nll_per_example", "nll_per_token", "first_token_nll"}}}.
    """
    if jax.process_count() > 1:
        raise ValueError("memory_cost runs on one process (it reads the scores of its own batches)")
    run = trainer.load_trained(workdir, upto="warmup")  # the frozen base backbone and Stage I's P_phi
    config, paths = run.config, run.paths
    store = trainer.load_feature_store(workdir, paths)
    tokenizer = prompt.load_tokenizer(paths.tokenizer_dir)
    prompt_tail = trainer.memory_prompt_tail(config, tokenizer)
    num_memory = int(config.medsynapse.sampler.num_queries)
    text_ids = tokenizer.encode(TEXT_MEMORY, add_special_tokens=False).ids
    text_ids = jnp.asarray((text_ids * num_memory)[:num_memory], jnp.int32)[None]   # (1, N)
    samplers = {"initial_sampler": trainer.init_sampler_params(run.sampler, store, config.seed),
                "trained_sampler": run.params["sampler"]}
    backbone, sampler = run.backbone, run.sampler

    @jax.jit
    def sampler_memory(sampler_params, feature_map):
        return sampler.apply({"params": sampler_params}, feature_map)

    @jax.jit
    def answer_nll(backbone_params, memory, batch):
        """(summed NLL (B,), answer tokens (B,), first token's NLL (B,)) of the reference answers."""
        log_probs = memory_lib.answer_log_probs(backbone, backbone_params, batch.prefix, memory, batch.answer_ids,
                                                batch.answer_valid, prompt_tail=prompt_tail)
        counted = batch.answer_valid & batch.example_valid[:, None]
        nll = -jnp.where(counted, log_probs, 0.0)
        return nll.sum(axis=1), counted.sum(axis=1), nll[:, 0]

    pipeline = trainer.pipeline_config(config)
    # Every record of the split once, in file order (the training iterator dropped the last partial batch).
    iterator = make_eval_batches(paths.data_dir, paths.tokenizer_dir, pipeline, split=split,
                                 k_max=pipeline.k_max_slots)
    totals = {name: _Totals() for name in CONDITIONS}
    mesh = sharding.mesh_from_config(config)
    with jax.set_mesh(mesh):   # text_memory's vectors, (1, N, D): the same for every batch
        text_memory = jax.jit(lambda p, ids: backbone.apply({"params": p}, ids, method=backbone.embed))(
            run.params["backbone"], text_ids).astype(jnp.float32)
    seen = 0
    for batch_np in iterator:
        if limit is not None and seen >= limit:
            break
        with jax.set_mesh(mesh):
            batch = trainer.warmup_batch(batch_np, store, backbone.config, mesh)
            memories = {name: sampler_memory(params, batch.feature_map) for name, params in samplers.items()}
            shape = memories["trained_sampler"].shape
            memories["no_memory"] = jnp.zeros((shape[0], 0, shape[2]), jnp.float32)
            memories["zero_memory"] = jnp.zeros(shape, jnp.float32)
            memories["text_memory"] = jnp.broadcast_to(text_memory, shape)
            scored = {name: answer_nll(run.params["backbone"], memories[name], batch) for name in CONDITIONS}
        valid = np.asarray(batch_np["example_valid"], bool)
        if limit is not None:
            valid &= np.cumsum(valid) <= limit - seen
        seen += int(valid.sum())
        for name in CONDITIONS:
            nll, tokens, first = (np.asarray(x) for x in scored[name])
            t = totals[name]
            t.nll += float(nll[valid].sum())
            t.tokens += int(tokens[valid].sum())
            t.first_nll += float(first[valid].sum())
            t.examples += int(valid.sum())
    if not seen:
        raise ValueError(f"{paths.data_dir}: split {split!r} has no records")
    return {"workdir": os.path.abspath(workdir), "split": split, "examples": seen,
            "memory_position": trainer.memory_position(config),
            "num_memory": num_memory,
            "conditions": {name: totals[name].summary() for name in CONDITIONS}}


def format_table(result: dict) -> str:
    lines = [f"{result['split']} split, {result['examples']} examples, N = {result['num_memory']} memory vectors "
             f"({result['memory_position']}); answer NLL in nats:",
             f"  {'memory':<18}{'per example':>12}{'per token':>11}{'first token':>13}"]
    for name, c in result["conditions"].items():
        lines.append(f"  {name:<18}{c['nll_per_example']:>12.3f}{c['nll_per_token']:>11.4f}"
                     f"{c['first_token_nll']:>13.4f}")
    return "\n".join(lines)


def main(argv):
    from vital_jax.checkpoint import CheckpointError
    from vital_jax.models.hf_config import ConfigError

    cli.no_positional(argv)
    cli.require(workdir=_WORKDIR.value)
    cli.quiet_libraries()
    out = _OUT.value or os.path.join(_WORKDIR.value, f"memory_cost_{_SPLIT.value}.json")
    try:
        cli.status(f"scoring the {_SPLIT.value} split's answers under {len(CONDITIONS)} memories...")
        result = memory_cost(_WORKDIR.value, _SPLIT.value, _LIMIT.value)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as e:
        cli.fail(e)
    atomic_write(out, lambda f: json.dump(result, f, indent=2))
    print(format_table(result))
    print(f"written to {out}")
    return 0


def _define_flags():
    """Flags exist only when this module runs as a program (importing it defines none)."""
    global _WORKDIR, _SPLIT, _LIMIT, _OUT
    _WORKDIR = flags.DEFINE_string("workdir", None, "a MedSynapse-V run whose Stage I finished")
    _SPLIT = flags.DEFINE_string("split", "val", "records split to score")
    _LIMIT = flags.DEFINE_integer("limit", None, "at most N examples", lower_bound=1)
    _OUT = flags.DEFINE_string("out", None, "JSON file (default: <workdir>/memory_cost_<split>.json)")


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
