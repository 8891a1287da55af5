"""Samples/s of the jitted VITAL train step against a plain PyTorch step of the same model, in one run.

    python -m benchmarks.train_step [--steps 5] [--torch_threads N] [--quick]

Both sides hold the same tiny random model (built with transformers, converted for JAX): a Qwen3-VL backbone
(text hidden 128 x 2 layers, vision hidden 64 x 2 blocks) with LoRA r=8 on q,k,v,o,gate,up,down of every text
layer, a Qwen3 decoder (hidden 64 x 2 layers), pj_in and the visual projector; batch 2, one 128x128 image each
(16 image tokens), K = 4 latent steps, answer 8 tokens, step chains 8 tokens; float32; dropout on (training).

The PyTorch step is written plainly with transformers' own modules: LoRA wrappers around the nn.Linear layers,
prefill with a DynamicCache, K latent steps feeding the last hidden state back as inputs_embeds at MRoPE position
T + k + rope_delta, the answer teacher-forced over the cache, the three losses (Eq. 7), AdamW over the trainable
parameters only (with global-norm clipping, as `trainable.make_optimizer`), backward through the whole loop.
`--quick`: smaller still, one timed step (the CI smoke test; its times mean nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import tempfile
import time

import jax
import numpy as np
import torch
from torch import nn

from benchmarks.machine import apply_host_setting, cpu_description
from conversion.torch_decoding import cache_keyword
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
LR, WD, CLIP = 1e-4, 0.01, 1.0
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The model and batch both sides train (the defaults are this script's tiny step; `peer_train_step` sets the
    issue-#16 sizes). Text token ids are drawn from [0, 180) whatever the vocabulary (190/188/189 are the image
    tokens)."""

    batch: int = 2
    latent_steps: int = 4
    grid: tuple[int, int, int] = (1, 8, 8)
    answer: int = 8
    step_chain: int = 8
    roi_dim: int = 32
    lora_rank: int = 8
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_head_dim: int = 32
    mrope_section: tuple[int, int, int] = (8, 4, 4)  # sums to text_head_dim / 2
    vocab: int = 200
    vision_hidden: int = 64
    vision_depth: int = 2
    vision_heads: int = 4
    decoder_hidden: int = 64
    decoder_layers: int = 2
    decoder_heads: int = 4
    decoder_head_dim: int = 16


# The CI smoke tests' sizes (this script's and `peer_train_step`'s `--quick`).
QUICK = Sizes(grid=(1, 4, 4), answer=4, step_chain=4, lora_rank=4, text_hidden=64, text_layers=1, text_heads=2,
              text_kv_heads=1, vision_hidden=32, vision_depth=1, vision_heads=2, decoder_hidden=32, decoder_layers=1,
              decoder_heads=2)


def build_hf(path: str, sizes: Sizes = Sizes()):
    backbone = save_tiny_qwen3_vl(
        f"{path}/backbone", seed=3,
        text=dict(vocab_size=sizes.vocab, hidden_size=sizes.text_hidden, intermediate_size=2 * sizes.text_hidden,
                  num_hidden_layers=sizes.text_layers, num_attention_heads=sizes.text_heads,
                  num_key_value_heads=sizes.text_kv_heads, head_dim=sizes.text_head_dim,
                  rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                   "mrope_section": list(sizes.mrope_section), "mrope_interleaved": True}),
        vision=dict(depth=sizes.vision_depth, hidden_size=sizes.vision_hidden,
                    intermediate_size=2 * sizes.vision_hidden, num_heads=sizes.vision_heads,
                    deepstack_visual_indexes=list(range(min(2, sizes.vision_depth)))))
    decoder = save_tiny_qwen3(f"{path}/decoder", seed=4, vocab_size=200, hidden_size=sizes.decoder_hidden,
                              head_dim=sizes.decoder_head_dim, num_hidden_layers=sizes.decoder_layers,
                              num_attention_heads=sizes.decoder_heads, num_key_value_heads=sizes.decoder_heads // 2,
                              intermediate_size=2 * sizes.decoder_hidden)
    return backbone, decoder


def synthetic(patch_dim: int, seed: int = 0, sizes: Sizes = Sizes()) -> dict:
    """Equal-length prompts (no padding), every example with K latent steps and full chains."""
    b, k, grid = sizes.batch, sizes.latent_steps, sizes.grid
    rng = np.random.RandomState(seed)
    n_img = int(np.prod(grid)) // 4
    rows = [list(rng.randint(0, 180, 5)) + [VS] + [IMG] * n_img + [VE] + list(rng.randint(0, 180, 9))
            for _ in range(b)]
    prompt = np.asarray(rows, np.int32)
    roi = rng.randn(b, sizes.roi_dim).astype(np.float32)
    return dict(prompt_ids=prompt, prompt_valid=np.ones(prompt.shape, bool),
                pixel_patches=rng.randn(b * int(np.prod(grid)), patch_dim).astype(np.float32),
                image_grid_thw=np.asarray([grid] * b, np.int32),
                answer_ids=rng.randint(0, 180, (b, sizes.answer)).astype(np.int32),
                answer_valid=np.ones((b, sizes.answer), bool), latent_steps=np.full((b,), k, np.int32),
                step_ids=rng.randint(0, 180, (b, k, sizes.step_chain)).astype(np.int32),
                step_valid=np.ones((b, k, sizes.step_chain), bool),
                roi_feature=roi / np.linalg.norm(roi, axis=1, keepdims=True), example_valid=np.ones((b,), bool))


# --------------------------------------------------------------------------------------------------- JAX
def jax_step(path: str, data: dict, sizes: Sizes = Sizes(), **model_overrides):
    """model_overrides: Qwen3VLConfig / Qwen3Config fields (e.g. attention_impl) for both models."""
    backbone_config = Qwen3VLConfig.from_pretrained(f"{path}/backbone", **model_overrides)
    decoder_config = Qwen3Config.from_pretrained(f"{path}/decoder", **model_overrides)
    rank = sizes.lora_rank
    model = VitalModel(VitalConfig(k_max=sizes.latent_steps, roi_dim=sizes.roi_dim,
                                   lora=LoraConfig(rank, 2.0 * rank, 0.05)), backbone_config, decoder_config)
    params = model.init_params(jax.random.PRNGKey(0), load_params(f"{path}/backbone", backbone_config),
                               load_qwen3(f"{path}/decoder", decoder_config))
    train_params, _ = trainable.split(params, trainable.trainable_mask(params))
    optimizer = trainable.make_optimizer(LR, WD, max_grad_norm=CLIP,
                                         decay_mask=trainable.weight_decay_mask(train_params))
    # On the device once, as the trainer lays them out on its mesh (`sharding.shard`): the loaded weights are numpy
    # arrays, which a jitted call would otherwise copy in again at every step (~80 ms at the peer sizes).
    state, frozen = jax.device_put(init_train_state(params, optimizer, jax.random.PRNGKey(1)))
    batch = from_numpy(data, backbone_config)
    step = jax.jit(functools.partial(train_step, model, optimizer), donate_argnums=(0,))
    # model + lower: for benchmarks that read the compiled step (benchmarks.train_floor's FLOP count).
    holder = {"state": state, "model": model, "lower": lambda: step.lower(holder["state"], frozen, batch)}

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


def add_peft_lora(backbone, rank: int, alpha: float, dropout: float):
    """The same adapters through peft (what a PyTorch user of VITAL writes): LoRA on the 7 projections of the text
    decoder's layers only (the regex keeps peft away from the vision tower's `mlp` linears). Returns the peft
    model, whose base model is `backbone` with its linears wrapped."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = "|".join(LORA_TARGETS)
    config = PeftLoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                            target_modules=rf".*language_model\.layers\.\d+\.(self_attn|mlp)\.({targets})")
    return get_peft_model(backbone, config)


def torch_step(backbone, decoder, data: dict, sizes: Sizes = Sizes(), lora: str = "plain"):
    """lora: "plain" (this file's LoraLinear) or "peft" (`add_peft_lora`)."""
    from transformers import DynamicCache

    B, K, ANSWER, STEP, RANK = sizes.batch, sizes.latent_steps, sizes.answer, sizes.step_chain, sizes.lora_rank
    torch.manual_seed(0)
    backbone.requires_grad_(False)
    if lora == "peft":
        add_peft_lora(backbone, RANK, 2.0 * RANK, 0.05)  # wraps backbone's linears in place
    else:
        add_lora(backbone, RANK, 2.0 * RANK, 0.05)
    d, d_dec = backbone.config.text_config.hidden_size, decoder.config.hidden_size
    pj_in, vp = nn.Linear(d, d_dec), TorchVisualProjector(d, sizes.roi_dim)
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
    keyword = cache_keyword(lm)

    def loss_fn():
        cache = DynamicCache(config=backbone.config)
        out = lm(input_ids=ids, attention_mask=mask, position_ids=positions, pixel_values=pixels,
                 image_grid_thw=grid, mm_token_type_ids=mm_types, use_cache=True, **{keyword: cache})
        z = out.last_hidden_state[:, -1]
        zs = []
        for k in range(K):
            pos = (t + k + rope_delta).view(1, B, 1).expand(3, B, 1)
            out = lm(inputs_embeds=z[:, None], position_ids=pos, use_cache=True, **{keyword: cache})
            z = out.last_hidden_state[:, 0]
            zs.append(z)
        z_bkd = torch.stack(zs, dim=1)
        pos = (t + K + rope_delta + torch.arange(ANSWER - 1)[None]).view(1, B, ANSWER - 1).expand(3, B, -1)
        out = lm(input_ids=answer[:, :-1], position_ids=pos, use_cache=True, **{keyword: cache})
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


def compare(sizes: Sizes, steps: int, lora: str = "plain", warmup: int = 5, **model_overrides) -> float:
    """Build both sides at `sizes`, time `steps` train steps of each (after a first call that compiles and
    `warmup` untimed steps; the two alternate step by step, so background load hits both alike), print one line
    per side and the ratio last; returns the ratio (torch seconds per step / jax seconds per step).

    Why the warm-up: both sides speed up over their first ~8 steps on this CPU (at the peer sizes, one run
    alternating: jax 1,164 -> 927 ms, torch 1,259 -> 1,116 ms; likely glibc's malloc raising its mmap threshold
    as large buffers are freed, so that later steps page-fault less: not verified), and a training run lives in
    the steady state."""
    host = apply_host_setting()
    with tempfile.TemporaryDirectory() as path:
        hf_backbone, hf_decoder = build_hf(path, sizes)
        vis = hf_backbone.config.vision_config
        data = synthetic(vis.in_channels * vis.temporal_patch_size * vis.patch_size ** 2, sizes=sizes)
        j_run, j_out = jax_step(path, data, sizes, **model_overrides)
        t_run, t_out, n_train = torch_step(hf_backbone, hf_decoder, data, sizes, lora)
    b = sizes.batch
    print(f"{cpu_description()}; {host}; jax {jax.__version__} on {jax.devices()[0].device_kind}; "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads, LoRA: {lora}); batch {b}, "
          f"K {sizes.latent_steps}, prompt {data['prompt_ids'].shape[1]} tokens, answer {sizes.answer}, "
          f"step chains {sizes.step_chain}; "
          f"{n_train:,} trainable params (LoRA r={sizes.lora_rank} + decoder + heads)")
    first = {}
    for name, run in (("jax", j_run), ("torch", t_run)):
        t0 = time.perf_counter()
        run()
        first[name] = time.perf_counter() - t0
    for _ in range(warmup):
        j_run()
        t_run()
    times = {"jax": [], "torch": []}
    for _ in range(steps):
        for name, run in (("jax", j_run), ("torch", t_run)):
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    j_s, t_s = float(np.median(times["jax"])), float(np.median(times["torch"]))
    print(f"jax   train step: first call (compile) {first['jax']:.1f}s, then {j_s * 1e3:.1f} ms/step "
          f"(median of {steps} after {warmup} warm-up) = {b / j_s:.1f} samples/s; loss {j_out['loss']:.3f}")
    print(f"torch train step: first call {first['torch']:.2f}s, then {t_s * 1e3:.1f} ms/step "
          f"(median of {steps} after {warmup} warm-up) = {b / t_s:.1f} samples/s; loss {t_out['loss']:.3f}")
    print(f"ratio jax/torch samples/s: {t_s / j_s:.2f}x")
    return t_s / j_s


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps of each side after the first call")
    p.add_argument("--torch_threads", type=int, default=0, help="0 = torch's default")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 1 timed step, for the CI smoke test")
    args = p.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    sizes, steps, warmup = (QUICK, 1, 0) if args.quick else (Sizes(), args.steps, args.warmup)
    compare(sizes, steps, warmup=warmup)


if __name__ == "__main__":
    main()
