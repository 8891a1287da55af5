"""The training probe: one fixed example's latent steps in TensorBoard every `logging.probe_every_steps` steps.

Paper §3.3's two windows on the latent steps z_1..z_K, watched while the model trains:

  probe/heatmap/z<k>   `explain`'s step figure (`eval.figures.step_figure`): the example's image with
                       cos(VP(z_k), encoder patch) overlaid, a colour bar, the decoded step as caption; needs the
                       ROI encoder (`model.roi_encoder_dir`, the demo's own, else the one the dataset's ROI
                       features were extracted with: `data.roi.heatmap_encoder_dir`), text only without it
  probe/latent_steps   a Markdown table: what the auxiliary decoder reads from each z_k beside the teacher's
                       step, under the question, the model's answer and the reference answer

The example is the record `logging.probe_record` or, when that is empty, the first record of the val split, and it
runs at its own K as training runs it (capped by `vital.latent_steps_cap`; at K = 0, the answer alone). Everything
that does not change during training (the prompt's prefix inputs, the encoder's patch features) is computed once at
setup; one jitted program (latent generation, `interpret.decode_latents`, `interpret.latent_heatmaps`) then serves
every call. All processes run it, the primary writes.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from vital_jax import distributed
from vital_jax.data.images import load_image
from vital_jax.data.records import RECORDS_FILE, Record, read_records, roi_feature_layer
from vital_jax.data.roi import heatmap_encoder_dir, load_roi_encoder
from vital_jax.eval import figures
from vital_jax.generation import SamplingConfig
from vital_jax.prompt_encoder import PromptEncoder
from vital_jax.models.hf_config import ConfigError
from vital_jax.models.qwen3_vl import prompt
from vital_jax.vital import interpret, trainable
from vital_jax.vital.batch import trained_latent_steps
from vital_jax.vital.model import VitalModel

IMAGE_TAG = "probe/heatmap/z{}"
TEXT_TAG = "probe/latent_steps"
PROBE_SPLIT = "val"


@dataclasses.dataclass
class ProbeOutput:
    answer: str
    step_texts: list[str]           # K decoded latent steps
    heatmaps: np.ndarray | None     # (K, g, g) cos(VP(z_k), patch); None without an ROI encoder


def select_record(data_dir: str, record_id: str = "") -> Record:
    """The record named `record_id`, or the first record of the val split when it is empty."""
    records = read_records(os.path.join(data_dir, RECORDS_FILE))
    if record_id:
        found = [r for r in records if r.id == record_id]
        if not found:
            raise ConfigError(f"config.logging.probe_record={record_id!r}: no such record in {data_dir}")
        return found[0]
    for record in records:
        if record.split == PROBE_SPLIT:
            return record
    raise ConfigError(f"{data_dir} has no {PROBE_SPLIT!r} records to probe; set config.logging.probe_record")


def figure_rgb(fig) -> np.ndarray:
    """A matplotlib figure (on the Agg canvas, as `eval.figures.new` makes them) drawn to (H, W, 3) uint8."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def heatmap_images(image_rgb: np.ndarray, maps: np.ndarray, step_texts: list[str]) -> list[np.ndarray]:
    """One RGB array per latent step: the step figure `explain` draws (`figures.step_figure`), the (g, g) map over
    the image in one colour scale (cosine units) shared by the K maps, captioned with the step's decoded text."""
    value_range = figures.heatmap_range(maps)
    return [figure_rgb(figures.step_figure(image_rgb, heatmap, f"z{k}: {text}", value_range))
            for k, (heatmap, text) in enumerate(zip(maps, step_texts), start=1)]


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "&nbsp;"


def markdown(record: Record, output: ProbeOutput) -> str:
    """The text summary: question, answers, and a table of decoded latent steps against the teacher's steps."""
    lines = [f"**Q:** {_cell(record.question)}  ",
             f"**A:** {_cell(output.answer)} (reference: {_cell(record.answer)}; record {record.id}, "
             f"K = {len(output.step_texts)})", "",
             "| step | decoded z_k | teacher step |", "|---|---|---|"]
    chain = record.reasoning_chain
    for k, text in enumerate(output.step_texts):
        teacher = chain[k] if k < len(chain) else ""
        lines.append(f"| z{k + 1} | {_cell(text)} | {_cell(teacher)} |")
    return "\n".join(lines)


def _probe(model: VitalModel, sampling: SamplingConfig, k: int, step_tokens: int, train_params, frozen, prefix,
           patch_features):
    params = trainable.merge(train_params, frozen)
    latent_steps = jnp.full((prefix.input_ids.shape[0],), k, jnp.int32)
    tokens, lengths, z = model.generate(params["backbone"], prefix, latent_steps, sampling, k_slots=k,
                                        pause_embeddings=params.get("pause_embeddings"))
    if not k:  # a run capped at K = 0 answers with no latent step: nothing to decode or draw
        return tokens, lengths, None, None, None
    step_ids, step_lengths = interpret.decode_latents(model, params, z, step_tokens, sampling.eos_token_ids)
    maps = None if patch_features is None else interpret.latent_heatmaps(model, params, z, patch_features)
    return tokens, lengths, step_ids, step_lengths, maps


class Probe:
    """Runs the model on the fixed probe example (`__call__`) and writes what it shows to TensorBoard (`write`)."""

    def __init__(self, model: VitalModel, config, paths, mesh):
        self.record = select_record(paths.data_dir, config.logging.probe_record)
        # The K training runs this record with (`vital.latent_steps_cap` included), so the probe shows that model.
        self.k = trained_latent_steps(self.record.latent_steps, model.config.k_max, model.config.latent_steps_cap)
        self.mesh = mesh
        self.prompts = PromptEncoder(model.backbone_config, config.data, paths.tokenizer_dir, batch_size=1)
        image_path = os.path.join(paths.data_dir, self.record.image)
        # The loader the pipeline and the predictor read images with: its checks, and its window of 16-bit files.
        self.image_rgb = load_image(image_path)
        replicated = NamedSharding(mesh, PartitionSpec())

        def everywhere(x):  # the same host copy on every process -> one replicated global array
            return distributed.global_from_host_copy(np.asarray(x), replicated)

        prefix, _ = self.prompts.encode([image_path], [self.record.question])
        self.prefix = jax.tree.map(everywhere, prefix)
        self.patch_features = None
        # The run's encoder, else the one the dataset's ROI features came from; None (with a warning, from process
        # 0: every process reads the same files) without one.
        with distributed.warnings_from_primary():
            encoder_dir = (heatmap_encoder_dir(paths.data_dir, paths.encoder_dir, "config.model.roi_encoder_dir")
                           if self.k else None)
            if not encoder_dir and self.k:
                logging.warning("training probe: no heatmaps; the decoded latent steps are still written")
        if encoder_dir:
            # The encoder output the ROI targets were pooled from: VP(z_k) is compared in that space.
            encoder, encoder_params = load_roi_encoder(encoder_dir, roi_feature_layer(paths.data_dir))
            self.patch_features = everywhere(encoder.image_patches(encoder_params, self.image_rgb))
        sampling = SamplingConfig(max_new_tokens=config.data.max_answer_tokens,
                                  eos_token_ids=self.prompts.eos_token_ids,
                                  pad_token_id=self.prompts.special[prompt.ENDOFTEXT])
        self._run = jax.jit(functools.partial(_probe, model, sampling, self.k, config.data.max_step_tokens),
                            out_shardings=replicated)

    def __call__(self, train_params, frozen) -> ProbeOutput:
        """The probe example under the current parameters (the train state's trainable tree + the frozen tree)."""
        with jax.set_mesh(self.mesh):
            tokens, lengths, step_ids, step_lengths, maps = self._run(train_params, frozen, self.prefix,
                                                                      self.patch_features)
        answer = self.prompts.decode(np.asarray(tokens)[0], np.asarray(lengths)[0])
        if step_ids is None:  # K = 0
            return ProbeOutput(answer=answer, step_texts=[], heatmaps=None)
        step_ids, step_lengths = np.asarray(step_ids)[0], np.asarray(step_lengths)[0]
        return ProbeOutput(answer=answer,
                           step_texts=[self.prompts.decode(step_ids[i], step_lengths[i]) for i in range(self.k)],
                           heatmaps=None if maps is None else np.asarray(maps, np.float32)[0])

    def write(self, writer, step: int, output: ProbeOutput) -> None:
        """One image per latent step and the text summary, at `step` (writer: `observability.TensorBoardWriter`)."""
        if output.heatmaps is not None:
            for k, rgb in enumerate(heatmap_images(self.image_rgb, output.heatmaps, output.step_texts), start=1):
                writer.image(step, IMAGE_TAG.format(k), rgb)
        writer.text(step, TEXT_TAG, markdown(self.record, output))
