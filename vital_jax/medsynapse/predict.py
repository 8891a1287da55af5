"""Answer (image, question) pairs with a trained MedSynapse-V run through one of its two memory branches: shared by
`vital_jax.evaluate` and the benchmarks.

  memory="autonomous"  the deployed model (§2.4): backbone (+ Stage II's LoRA) + A_psi on the VLM's own visual
                       tokens (`deploy.generate`). E_ana and P_phi are not in its parameters or its program.
                       Needs a run whose Stage III ("imt") finished.
  memory="sampler"     the teacher branch: M = P_phi(E_ana(X)) (`memory.generate`). E_ana runs inside the timed
                       program on each image (the stored feature maps cover only the training dataset, and the
                       latency of this branch is the cost the paper's Stage III removes).

Both answer greedily (the evaluation protocol of VITAL's predictor) and batch examples into fixed shapes
(`prompt_encoder.PromptEncoder`), so one compiled program serves every batch of a prompt bucket.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vital_jax.generation import SamplingConfig
from vital_jax.prompt_encoder import PromptEncoder, same_source
from vital_jax.medsynapse import deploy
from vital_jax.medsynapse import memory as memory_lib
from vital_jax.medsynapse.encoder import AnatomicalEncoder
from vital_jax.medsynapse.trainer import anatomical_encoder, memory_prompt_tail
from vital_jax.models.qwen3_vl import params as qwen3_vl_params
from vital_jax.models.qwen3_vl import prompt
from vital_jax.models.qwen3_vl.modeling import Qwen3VLForConditionalGeneration

MEMORIES = ("autonomous", "sampler")


def check_memory(memory: str, stages_done: Sequence[str]) -> None:
    """A branch the run cannot answer with is a ValueError naming what is missing."""
    if memory not in MEMORIES:
        raise ValueError(f"memory must be one of {MEMORIES}, got {memory!r}")
    if memory == "autonomous" and "imt" not in stages_done:
        raise ValueError(f"memory='autonomous' needs A_psi, trained by Stage III ('imt'); this run finished "
                         f"{tuple(stages_done) or 'no stage'}: evaluate it with memory='sampler'")


class MemoryPredictor(PromptEncoder):
    """Answer batches of (image, question) with a MedSynapse-V run (`trainer.load_trained`) and one memory branch.

    trained: a `trainer.TrainedMedSynapse` (backbone, sampler, autonomous modules; params {"backbone", "sampler",
    "autonomous"?}; config; paths). encoder / encoder_params: E_ana, needed by memory="sampler" only.
    """

    def __init__(self, trained, memory: str, batch_size: int = 4, max_new_tokens: int = 32,
                 encoder: AnatomicalEncoder | None = None, encoder_params=None):
        check_memory(memory, trained.stages_done)
        if memory == "sampler" and encoder is None:
            raise ValueError("memory='sampler' needs the anatomical encoder E_ana (encoder, encoder_params)")
        super().__init__(trained.backbone.config, trained.config.data, trained.paths.tokenizer_dir, batch_size)
        self.memory = memory
        self._source = _source_of(trained)  # what `shared_predictor` checks before reusing this predictor
        self.encoder = encoder if memory == "sampler" else None
        self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, eos_token_ids=self.eos_token_ids,
                                       pad_token_id=self.special[prompt.ENDOFTEXT])
        # Decode in `qwen3_vl_params.decoding_layout`, as VITAL's Predictor does (unrolled text layers, float32
        # adapters folded in, fused projections).
        config, backbone_params, lora = qwen3_vl_params.decoding_layout(
            trained.backbone.config, trained.params["backbone"], trained.backbone.lora)
        backbone = Qwen3VLForConditionalGeneration(config, lora)
        sampler, sampling = trained.sampler, self.sampling
        # The memory goes where the run trained it (config medsynapse.memory_position).
        prompt_tail = memory_prompt_tail(trained.config, self.tokenizer)
        if memory == "autonomous":
            # Exactly the deployable tree: a tree still holding P_phi would be refused by deploy.generate.
            self.params = deploy.deployable_params({**trained.params, "backbone": backbone_params})
            generate = deploy.make_generate(backbone, trained.autonomous, sampling, prompt_tail)
            self._generate = lambda prefix, pixels: generate(self.params, prefix)
        else:
            self.params = {"backbone": backbone_params, "sampler": trained.params["sampler"],
                           "encoder": encoder_params}
            encoder_ = self.encoder

            @jax.jit
            def teacher(params, prefix, pixels):
                feature_map = encoder_.feature_map(params["encoder"], pixels)
                memory_bnd = sampler.apply({"params": params["sampler"]}, feature_map)
                return memory_lib.generate(backbone, params["backbone"], prefix, memory_bnd, sampling,
                                           prompt_tail=prompt_tail)

            self._generate = lambda prefix, pixels: teacher(self.params, prefix, pixels)

    def encode(self, images: Sequence, questions: Sequence[str]):
        """Images + questions -> ((PrefixInputs, E_ana pixels (B, S, S, 3) or None), number of real examples)."""
        prefix, n = super().encode(images, questions)
        if self.encoder is None:
            return (prefix, None), n
        pixels = [self.encoder.preprocess(image) for image in images]
        pixels += [pixels[0]] * (self.batch_size - len(pixels))  # padding examples repeat the first, as the prompts
        return (prefix, jnp.asarray(np.stack(pixels))), n

    def run_encoded(self, encoded, n: int) -> tuple[list[str], float]:
        """Generate for an encoded batch; returns (answers, ms per example of the device program)."""
        prefix, pixels = encoded
        start = time.perf_counter()
        tokens, lengths = self._generate(prefix, pixels)
        tokens = np.asarray(jax.block_until_ready(tokens))
        elapsed = (time.perf_counter() - start) * 1e3
        texts = [self.decode(row, length) for row, length in zip(tokens[:n], np.asarray(lengths)[:n])]
        return texts, elapsed / self.batch_size

    def built_for(self, trained) -> bool:
        """Whether this predictor was built from exactly this run's modules, parameter trees, config and paths (none
        replaced since)."""
        return same_source(_source_of(trained), self._source)

    def warm_up(self, encoded_batches) -> None:
        """Compile once per distinct prompt bucket, so that reported latencies exclude compilation."""
        seen = set()
        for encoded, n in encoded_batches:
            width = encoded[0].input_ids.shape[1]
            if width not in seen:
                seen.add(width)
                self.run_encoded(encoded, n)


def shared_predictor(trained, memory: str, batch_size: int, max_new_tokens: int) -> MemoryPredictor:
    """The run's MemoryPredictor for (memory, batch_size, max_new_tokens), built once (`TrainedMedSynapse.predictors`)
    so that its compiled programs serve every later evaluation of the run (a new predictor traces and compiles its
    programs again: ~10 s a branch for the study's tiny models); rebuilt if the run's modules, parameters, config or
    paths were replaced since (`dataclasses.replace` of a run shares its `predictors`).
    E_ana (memory="sampler") is loaded once per run and shared by the sampler branch's predictors."""
    key = (memory, batch_size, max_new_tokens)
    predictor = trained.predictors.get(key)
    if predictor is None or not predictor.built_for(trained):
        encoder = encoder_params = None
        if memory == "sampler":
            loaded = [p for p in trained.predictors.values() if p.memory == "sampler" and p.built_for(trained)]
            encoder, encoder_params = ((loaded[0].encoder, loaded[0].params["encoder"]) if loaded
                                       else anatomical_encoder(trained.config, trained.paths))
        predictor = trained.predictors[key] = MemoryPredictor(trained, memory, batch_size, max_new_tokens, encoder,
                                                              encoder_params)
    return predictor


def _source_of(trained) -> dict:
    """What a predictor is built from: the modules, each parameter tree, the config and the paths of the run."""
    return {"backbone": trained.backbone, "sampler": trained.sampler, "autonomous": trained.autonomous,
            "config": trained.config, "paths": trained.paths,
            **{f"params.{name}": tree for name, tree in trained.params.items()}}
