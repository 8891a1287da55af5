"""Samples/s of the jitted VITAL train step against a plain PyTorch step of the same model, in one run.

    python -m benchmarks.train_step [--steps 5] [--torch_threads N]

Both sides hold the same tiny random model (built with transformers, converted for JAX): a Qwen3-VL backbone
(text hidden 128 x 2 layers, vision hidden 64 x 2 blocks) with LoRA r=8 on q,k,v,o,gate,up,down of every text
layer, a Qwen3 decoder (hidden 64 x 2 layers), pj_in and the visual projector; batch 2, one 128x128 image each
(16 image tokens), K = 4 latent steps, answer 8 tokens, step chains 8 tokens; float32; dropout on (training).

The PyTorch step is written plainly with transformers' own modules: LoRA wrappers around the nn.Linear layers,
prefill with a DynamicCache, K latent steps feeding the last hidden state back as inputs_embeds at MRoPE position
T + k + rope_delta, the answer teacher-forced over the cache, the three losses (Eq. 7), AdamW over the trainable
parameters only (with global-norm clipping, as `trainable.make_optimizer`), backward through the whole loop.
"""

from __future__ import annotations

import argparse
import functools
import math
import tempfile
import time

import jax
import numpy as np
import torch
from torch import nn

from tests.hf_reference import save_tiny_qwen3, save_tiny_qwen3_vl
from vital_jax.layers.linear import LoraConfig
from vital_jax.models.qwen3 import Qwen3Config
from vital_jax.models.qwen3 import load_params as load_qwen3
from vital_jax.models.qwen3_vl import Qwen3VLConfig, load_params
from vital_jax.vital import trainable
from vital_jax.vital.batch import from_numpy
from vital_jax.vital.config import VitalConfig
from vital_jax.vital.model import VitalModel
from vital_jax.vital.train_step import init_train_state, train_step

IMG, VS, VE = 190, 188, 189
B, K, GRID, ANSWER, STEP, ROI_DIM, RANK = 2, 4, (1, 8, 8), 8, 8, 32, 8
LR, WD, CLIP = 1e-4, 0.01, 1.0
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_hf(path: str):
    backbone = save_tiny_qwen3_vl(
        f"{path}/backbone", seed=3,
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32,
                  rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [8, 4, 4],
                                   "mrope_interleaved": True}),
        vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4))
    decoder = save_tiny_qwen3(f"{path}/decoder", seed=4, vocab_size=200, hidden_size=64, head_dim=16,
                              num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
    return backbone, decoder


def synthetic(patch_dim: int, seed: int = 0) -> dict:
    """Equal-length prompts (no padding), every example with K latent steps and full chains."""
    rng = np.random.RandomState(seed)
    n_img = int(np.prod(GRID)) // 4
    rows = [list(rng.randint(0, 180, 5)) + [VS] + [IMG] * n_img + [VE] + list(rng.randint(0, 180, 9))
            for _ in range(B)]
    prompt = np.asarray(rows, np.int32)
    roi = rng.randn(B, ROI_DIM).astype(np.float32)
    return dict(prompt_ids=prompt, prompt_valid=np.ones(prompt.shape, bool),
                pixel_patches=rng.randn(B * int(np.prod(GRID)), patch_dim).astype(np.float32),
                image_grid_thw=np.asarray([GRID] * B, np.int32),
                answer_ids=rng.randint(0, 180, (B, ANSWER)).astype(np.int32),
                answer_valid=np.ones((B, ANSWER), bool), latent_steps=np.full((B,), K, np.int32),
                step_ids=rng.randint(0, 180, (B, K, STEP)).astype(np.int32),
                step_valid=np.ones((B, K, STEP), bool),
                roi_feature=roi / np.linalg.norm(roi, axis=1, keepdims=True), example_valid=np.ones((B,), bool))


def time_steps(step, n: int) -> tuple[float, float]:
    """(first call seconds, median seconds of the next n calls)."""
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times))


# --------------------------------------------------------------------------------------------------- JAX
def jax_step(path: str, data: dict):
    backbone_config = Qwen3VLConfig.from_pretrained(f"{path}/backbone")
    decoder_config = Qwen3Config.from_pretrained(f"{path}/decoder")
    model = VitalModel(VitalConfig(k_max=K, roi_dim=ROI_DIM, lora=LoraConfig(RANK, 2.0 * RANK, 0.05)),
                       backbone_config, decoder_config)
    params = model.init_params(jax.random.PRNGKey(0), load_params(f"{path}/backbone", backbone_config),
                               load_qwen3(f"{path}/decoder", decoder_config))
    train_params, _ = trainable.split(params, trainable.trainable_mask(params))
    optimizer = trainable.make_optimizer(LR, WD, max_grad_norm=CLIP,
                                         decay_mask=trainable.weight_decay_mask(train_params))
    state, frozen = init_train_state(params, optimizer, jax.random.PRNGKey(1))
    batch = from_numpy(data, backbone_config)
    step = jax.jit(functools.partial(train_step, model, optimizer), donate_argnums=(0,))
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], frozen, batch)
        holder["loss"] = float(jax.block_until_ready(metrics["loss"]))

    return run, holder


# ----------------------------------------------------------------------------------------------- PyTorch
class LoraLinear(nn.Module):
    """y = W x + (alpha / r) B(A(dropout(x))), with W frozen; B starts at 0 (the adapted model = the base)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.uniform_(self.lora_a.weight, -1 / math.sqrt(base.in_features), 1 / math.sqrt(base.in_features))
        nn.init.zeros_(self.lora_b.weight)
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / rank

    def forward(self, x):
        return self.base(x) + self.scaling * self.lora_b(self.lora_a(self.dropout(x)))


class TorchVisualProjector(nn.Module):
    """Eq. (5): LN_dv(W2(dropout(GELU(W1 LN_d(z))) + z))."""

    def __init__(self, d: int, dv: int, dropout: float = 0.1):
        super().__init__()
        self.norm_in, self.fc1 = nn.LayerNorm(d), nn.Linear(d, d)
        self.fc2, self.norm_out = nn.Linear(d, dv), nn.LayerNorm(dv)
        self.dropout = nn.Dropout(dropout)

    def forward(self, z):
        return self.norm_out(self.fc2(self.dropout(nn.functional.gelu(self.fc1(self.norm_in(z)))) + z))


def add_lora(backbone, rank: int, alpha: float, dropout: float) -> None:
    for layer in backbone.model.language_model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LORA_TARGETS:
                if hasattr(parent, name):
                    setattr(parent, name, LoraLinear(getattr(parent, name), rank, alpha, dropout))


def torch_step(backbone, decoder, data: dict):
    from transformers import DynamicCache

    torch.manual_seed(0)
    backbone.requires_grad_(False)
    add_lora(backbone, RANK, 2.0 * RANK, 0.05)
    d, d_dec = backbone.config.text_config.hidden_size, decoder.config.hidden_size
    pj_in, vp = nn.Linear(d, d_dec), TorchVisualProjector(d, ROI_DIM)
    modules = [backbone, decoder, pj_in, vp]
    for m in modules:
        m.train()
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=LR, betas=(0.9, 0.999), eps=1e-8)

    ids = torch.as_tensor(data["prompt_ids"], dtype=torch.long)
    mask = torch.ones_like(ids)
    pixels = torch.as_tensor(data["pixel_patches"])
    grid = torch.as_tensor(data["image_grid_thw"], dtype=torch.long)
    mm_types = (ids == IMG).int()
    answer = torch.as_tensor(data["answer_ids"], dtype=torch.long)
    steps = torch.as_tensor(data["step_ids"], dtype=torch.long)
    roi = torch.as_tensor(data["roi_feature"])
    lm = backbone.model
    positions, rope_delta = lm.get_rope_index(ids, mm_types, image_grid_thw=grid, attention_mask=mask)
    t = ids.shape[1]

    def loss_fn():
        cache = DynamicCache(config=backbone.config)
        out = lm(input_ids=ids, attention_mask=mask, position_ids=positions, pixel_values=pixels,
                 image_grid_thw=grid, mm_token_type_ids=mm_types, past_key_values=cache, use_cache=True)
        z = out.last_hidden_state[:, -1]
        zs = []
        for k in range(K):
            pos = (t + k + rope_delta).view(1, B, 1).expand(3, B, 1)
            out = lm(inputs_embeds=z[:, None], position_ids=pos, past_key_values=cache, use_cache=True)
            z = out.last_hidden_state[:, 0]
            zs.append(z)
        z_bkd = torch.stack(zs, dim=1)
        pos = (t + K + rope_delta + torch.arange(ANSWER - 1)[None]).view(1, B, ANSWER - 1).expand(3, B, -1)
        out = lm(input_ids=answer[:, :-1], position_ids=pos, past_key_values=cache, use_cache=True)
        logits = backbone.lm_head(torch.cat([z[:, None], out.last_hidden_state], dim=1))
        task = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), answer.reshape(-1))
        x = torch.cat([pj_in(z_bkd)[:, :, None], decoder.get_input_embeddings()(steps)], dim=2)
        dec_logits = decoder(inputs_embeds=x.reshape(B * K, STEP + 1, d_dec)).logits[:, :-1]
        text = nn.functional.cross_entropy(dec_logits.reshape(-1, dec_logits.shape[-1]), steps.reshape(-1))
        visual = (vp(z_bkd) - roi[:, None]).abs().mean()
        return task + 1.0 * text + 0.1 * visual

    holder = {}

    def run():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        holder["loss"] = float(loss.detach())

    return run, holder, sum(p.numel() for p in params)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--torch_threads", type=int, default=0, help="0 = torch's default")
    args = p.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory() as path:
        hf_backbone, hf_decoder = build_hf(path)
        vis = hf_backbone.config.vision_config
        data = synthetic(vis.in_channels * vis.temporal_patch_size * vis.patch_size ** 2)
        j_run, j_out = jax_step(path, data)
        t_run, t_out, n_train = torch_step(hf_backbone, hf_decoder, data)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); batch {B}, K {K}, prompt {data['prompt_ids'].shape[1]} tokens, "
          f"answer {ANSWER}, step chains {STEP}; {n_train:,} trainable params (LoRA r={RANK} + decoder + heads)")
    j_first, j_s = time_steps(j_run, args.steps)
    t_first, t_s = time_steps(t_run, args.steps)
    print(f"jax   train step: first call (compile) {j_first:.1f}s, then {j_s * 1e3:.1f} ms/step "
          f"(median of {args.steps}) = {B / j_s:.1f} samples/s; loss {j_out['loss']:.3f}")
    print(f"torch train step: first call {t_first:.2f}s, then {t_s * 1e3:.1f} ms/step "
          f"(median of {args.steps}) = {B / t_s:.1f} samples/s; loss {t_out['loss']:.3f}")
    print(f"ratio jax/torch samples/s: {t_s / j_s:.2f}x")


if __name__ == "__main__":
    main()
