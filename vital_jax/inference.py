"""Answer (image, question) pairs with a trained VITAL run (`run.load_run`) at any K: shared by evaluate,
explain, the study and the demo.

`Predictor` batches examples into fixed shapes (prompt and patch buckets, `prompt_encoder.PromptEncoder`) so one
compiled program serves every batch and every K <= K_max.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vital_jax.generation import SamplingConfig
from vital_jax.models.qwen3_vl import params as qwen3_vl_params
from vital_jax.models.qwen3_vl import prompt
from vital_jax.prompt_encoder import PromptEncoder, same_source
from vital_jax.run import TrainedRun
from vital_jax.vital import latent


class Predictor(PromptEncoder):
    """Answer batches of (image, question) with the deployed model: backbone + LoRA, K latent steps, greedy."""

    def __init__(self, run: TrainedRun, batch_size: int = 4, max_new_tokens: int = 32):
        super().__init__(run.model.backbone_config, run.config.data, run.paths.tokenizer_dir, batch_size)
        self.run = run
        # Decode in `qwen3_vl_params.decoding_layout`: unrolled text layers (a run trained with `scan_layers`, the
        # 8B recipe, would otherwise copy every layer's weights out of the stacks at each answer token), float32
        # adapters folded in, fused projections.
        self.source_params = run.params["backbone"]
        self._source = _source_of(run)  # what `shared_predictor` checks before reusing this predictor
        backbone_config, self.backbone_params, lora = qwen3_vl_params.decoding_layout(
            run.model.backbone_config, self.source_params, run.model.config.lora)
        self.model = dataclasses.replace(run.model, backbone_config=backbone_config,
                                         config=dataclasses.replace(run.model.config, lora=lora))
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, eos_token_ids=self.eos_token_ids,
                                       pad_token_id=self.special[prompt.ENDOFTEXT])
        model = self.model
        # One program per K (k_slots static): a masked K_max-step program would make every K cost as much as
        # K_max, and the K sweep reports latency.
        pause = run.params.get("pause_embeddings")  # the pause control's learned latent inputs, if any
        self._generate = jax.jit(lambda bp, pre, k, k_slots: model.generate(bp, pre, k, self.sampling,
                                                                            k_slots=k_slots, pause_embeddings=pause),
                                 static_argnums=(3,))
        # The program's part before decoding, up to a phase (`latent.answer_phases`), for `phase_latency`.
        self._phases = jax.jit(lambda bp, pre, k, k_slots, until: latent.answer_phases(
            model.backbone, bp, pre, k, k_slots, max_new_tokens, pause, until=until)[2], static_argnums=(3, 4))

    def built_for(self, run: TrainedRun) -> bool:
        """Whether this predictor was built from exactly this run's model, config, paths, backbone parameters and
        pause embeddings (none replaced since)."""
        return same_source(_source_of(run), self._source)

    def answer(self, images: Sequence, questions: Sequence[str], latent_steps: int):
        """Returns (answers list[str], z (n, K_max, D), per-example latency in ms)."""
        return self.run_encoded(*self.encode(images, questions), latent_steps)

    def run_encoded(self, prefix, n: int, latent_steps: int, per_example_steps=None):
        """Generate for an encoded batch (see `encode`); latency covers the device program only.

        `per_example_steps` (n ints, each <= latent_steps) gives every example its own K, as in training, where a
        batch mixes records of different K: the loop runs `latent_steps` slots and masks each example's extra ones.
        """
        k = np.full((self.batch_size,), latent_steps, np.int32)
        if per_example_steps is not None:
            steps = np.asarray(per_example_steps, np.int32)
            if steps.shape != (n,) or steps.min(initial=0) < 0 or steps.max(initial=0) > latent_steps:
                raise ValueError(f"per_example_steps {steps.tolist()} must be {n} values in 0..{latent_steps}")
            k[:n] = steps
        k = jnp.asarray(k)
        start = time.perf_counter()
        tokens, lengths, z = self._generate(self.backbone_params, prefix, k, latent_steps)
        tokens = np.asarray(jax.block_until_ready(tokens))
        elapsed = (time.perf_counter() - start) * 1e3
        texts = [self.decode(row, length) for row, length in zip(tokens[:n], np.asarray(lengths)[:n])]
        return texts, np.asarray(z)[:n], elapsed / self.batch_size

    def phase_latency(self, prefix, latent_steps: int, repeats: int = 3) -> dict[str, float]:
        """Figure 4(b)'s latency breakdown of one encoded batch at K = latent_steps, in ms per example: "prefill"
        (vision tower + prompt into the cache), "latent" (the K steps) and "decode" (the answer to its end token),
        from the best of `repeats` calls of three programs: the generate program's code up to each of the first two
        phases (compiled on first use, once per prompt width and K) and the whole program. Differences of best
        times: a phase shorter than the timing noise reads 0, never negative."""
        k = jnp.full((self.batch_size,), latent_steps, jnp.int32)

        def best(call) -> float:
            jax.block_until_ready(call())  # compiled, and the timing below excludes it
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(call())
                times.append((time.perf_counter() - start) * 1e3 / self.batch_size)
            return min(times)

        bp = self.backbone_params
        prefill = best(lambda: self._phases(bp, prefix, k, latent_steps, "prefill"))
        through_latent = best(lambda: self._phases(bp, prefix, k, latent_steps, "latent")) if latent_steps else prefill
        whole = best(lambda: self._generate(bp, prefix, k, latent_steps))
        return {"prefill": prefill, "latent": max(through_latent - prefill, 0.0),
                "decode": max(whole - max(through_latent, prefill), 0.0)}

    def warm_up(self, encoded_batches, latent_steps=(0,)) -> None:
        """Compile once per distinct prompt bucket and K, so that reported latencies exclude compilation."""
        for compile_one in self.warm_up_calls(encoded_batches, latent_steps):
            compile_one()

    def warm_up_calls(self, encoded_batches, latent_steps=(0,)) -> list:
        """What `warm_up` runs, one call per program (distinct prompt bucket x K), for `warm_up_all`."""
        calls, seen = [], set()
        for prefix, n in encoded_batches:
            width = prefix.input_ids.shape[1]
            if width not in seen:
                seen.add(width)
                calls += [functools.partial(self.run_encoded, prefix, n, k) for k in latent_steps]
        return calls


def shared_predictor(run: TrainedRun, batch_size: int, max_new_tokens: int) -> Predictor:
    """The run's Predictor for (batch_size, max_new_tokens), built once (`TrainedRun.predictors`) so its compiled
    programs serve every later caller; rebuilt if the run's model, config, paths or parameters were replaced since
    (`dataclasses.replace` of a run shares its `predictors`)."""
    key = (batch_size, max_new_tokens)
    predictor = run.predictors.get(key)
    if predictor is None or not predictor.built_for(run):
        predictor = run.predictors[key] = Predictor(run, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return predictor


def _source_of(run: TrainedRun) -> dict:
    """What a Predictor is built from (everything `Predictor.__init__` reads of the run)."""
    return {"model": run.model, "config": run.config, "paths": run.paths, "backbone": run.params["backbone"],
            "pause_embeddings": run.params.get("pause_embeddings")}


def warm_up_all(calls, workers: int = 2) -> None:
    """Run warm-up calls (`Predictor.warm_up_calls`) `workers` at a time. XLA compiles different programs in
    parallel threads: the demo's six evaluation programs took 24 s one at a time and 19 s two at a time on 2 CPU
    cores. An error in any call is raised here."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        for future in [pool.submit(call) for call in calls]:
            future.result()
