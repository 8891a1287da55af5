"""Qwen3-VL chat prompts for (image(s), question[, answer]) and their token ids.

The rendered text is what Qwen3-VL's chat template gives for one user turn (no default system message), after the
processor has expanded each image's single `<|image_pad|>` to one pad per merged vision token:

  [<|im_start|>system\\nSYSTEM<|im_end|>\\n]
  <|im_start|>user\\n(<|vision_start|><|image_pad|> x n_i<|vision_end|>)* QUESTION<|im_end|>\\n
  <|im_start|>assistant\\n[ANSWER<|im_end|>\\n]

with n_i = t*h*w / merge_size**2 for image i's grid_thw. Text is kept verbatim, as in QWEN3_VL_CHAT_TEMPLATE below;
later Qwen templates (Qwen3.5+) `|trim` message text, so strip questions and answers in the data pipeline if the
ids must agree with such a template's. The whole string is tokenised once, as the HF processor does, and the
image-pad tokens are then checked against the grids: a question that itself contains a special-token string, or a
tokenizer without these special tokens, fails loudly here instead of misplacing vision features later.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tokenizers

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

# A Jinja chat template equivalent to Qwen3-VL-Instruct's for system / user / assistant turns with text, image and
# video items (no tools, no reasoning content). Written for tokenizers built by `tiny_tokenizer.py`; a real
# checkpoint ships its own template.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and not loop.first %}"
    "{{- raise_exception('A system message must be the first message.') }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}"
    "{{- message.content }}"
    "{%- else %}"
    "{%- for item in message.content %}"
    "{%- if item.type == 'image' or 'image' in item or 'image_url' in item %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item.type == 'video' or 'video' in item %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in item %}"
    "{{- item.text }}"
    "{%- else %}"
    "{{- raise_exception('Unexpected content item in a message.') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


class PromptError(ValueError):
    """A prompt cannot be built or its image tokens do not match the image grids."""


@dataclass(frozen=True)
class PromptTokens:
    """Token ids of one prompt.

    input_ids: (S,) int32, the full sequence (prompt, then the answer and its `<|im_end|>\\n` when given).
    image_positions: (sum_i n_i,) int32, indices into input_ids of the image-pad tokens, image by image in order
      (merged vision token k of the concatenated images goes to input_ids[image_positions[k]]).
    prompt_length: number of tokens up to and including `<|im_start|>assistant\\n`; with an answer, tokens from
      here on are the ones to supervise (answer, `<|im_end|>`, `\\n`).
    """

    input_ids: np.ndarray
    image_positions: np.ndarray
    prompt_length: int


def num_image_tokens(grid_thw: np.ndarray, *, merge_size: int = 2) -> np.ndarray:
    """grid_thw (num_images, 3) or (3,) -> (num_images,) int64: image-pad tokens per image, t*h*w / merge_size**2."""
    grid_thw = _as_grids(grid_thw)
    if np.any(grid_thw[:, 1:] % merge_size):
        raise PromptError(f"grid_thw {grid_thw.tolist()}: h and w must be multiples of merge_size={merge_size}")
    return np.prod(grid_thw, axis=1) // (merge_size * merge_size)


def render_prompt(question: str, grid_thw: np.ndarray, *, answer: str | None = None, system: str | None = None,
                  merge_size: int = 2) -> str:
    """The prompt text with image pads expanded; images come before the question, in grid_thw order.

    grid_thw: (num_images, 3) or (3,); an empty (0, 3) array gives a text-only prompt.
    """
    parts = []
    if system is not None:
        parts.append(f"{IM_START}system\n{system}{IM_END}\n")
    parts.append(f"{IM_START}user\n")
    for count in num_image_tokens(grid_thw, merge_size=merge_size):
        parts.append(VISION_START + IMAGE_PAD * int(count) + VISION_END)
    parts.append(f"{question}{IM_END}\n{IM_START}assistant\n")
    if answer is not None:
        parts.append(f"{answer}{IM_END}\n")
    return "".join(parts)


def load_tokenizer(model_dir: str) -> tokenizers.Tokenizer:
    """`model_dir/tokenizer.json` -> tokenizers.Tokenizer (works for Qwen checkpoints and `build_tiny_tokenizer`).

    Raises PromptError naming the file when it is missing or unreadable, or lacks a Qwen special token.
    """
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise PromptError(f"{path}: not found; expected a HuggingFace model directory with a tokenizer")
    try:
        tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust side raises a plain Exception for malformed files
        raise PromptError(f"{path}: cannot load tokenizer: {e}") from e
    try:
        special_token_ids(tokenizer)
    except PromptError as e:
        raise PromptError(f"{path}: {e}") from e
    return tokenizer


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of the Qwen special tokens (see SPECIAL_TOKENS) in a tokenizers.Tokenizer or HF tokenizer."""
    backend = _backend(tokenizer)
    ids = {token: backend.token_to_id(token) for token in SPECIAL_TOKENS}
    missing = [token for token, token_id in ids.items() if token_id is None]
    if missing:
        raise PromptError(f"tokenizer has no id for {missing}; it is not a Qwen3-VL tokenizer")
    return ids


def user_turn_end_length(tokenizer) -> int:
    """How many tokens every prompt ends with after the question: `<|im_end|>\n<|im_start|>assistant\n`.

    Read off a rendered prompt (text-only, so it holds for any question: `<|im_end|>` is a special token, which the
    tokenizer never merges with the question's text), and checked against the header tokenised alone.
    """
    backend = _backend(tokenizer)
    tail = backend.encode(f"{IM_END}\n{IM_START}assistant\n", add_special_tokens=False).ids
    rendered = backend.encode(render_prompt("?", np.zeros((0, 3), np.int64)), add_special_tokens=False).ids
    if len(rendered) <= len(tail) or rendered[-len(tail):] != tail:
        raise PromptError("this tokenizer does not end a rendered prompt with the assistant header's own tokens")
    return len(tail)


def tokenize_prompt(tokenizer, question: str, grid_thw: np.ndarray, *, answer: str | None = None,
                    system: str | None = None, merge_size: int = 2) -> PromptTokens:
    """Render (see `render_prompt`) and tokenise one prompt; check its image tokens against grid_thw.

    tokenizer: a tokenizers.Tokenizer (`load_tokenizer`) or a transformers tokenizer (its backend is used).
    No special tokens are added beyond the template's (Qwen tokenizers add none; the HF processor agrees).
    """
    backend = _backend(tokenizer)
    ids = special_token_ids(backend)
    prompt_text = render_prompt(question, grid_thw, system=system, merge_size=merge_size)
    prompt_ids = np.asarray(backend.encode(prompt_text, add_special_tokens=False).ids, np.int32)
    if answer is None:
        input_ids = prompt_ids
    else:
        full_text = prompt_text + f"{answer}{IM_END}\n"
        input_ids = np.asarray(backend.encode(full_text, add_special_tokens=False).ids, np.int32)
        if len(input_ids) < len(prompt_ids) or not np.array_equal(input_ids[:len(prompt_ids)], prompt_ids):
            raise PromptError("tokenising prompt+answer does not start with the prompt's tokens; this tokenizer "
                              "merges across the assistant header, so prompt_length would be wrong")
    positions = check_image_tokens(input_ids, grid_thw, image_token_id=ids[IMAGE_PAD],
                                   vision_start_id=ids[VISION_START], vision_end_id=ids[VISION_END],
                                   merge_size=merge_size)
    return PromptTokens(input_ids=input_ids, image_positions=positions, prompt_length=len(prompt_ids))


def check_image_tokens(input_ids: np.ndarray, grid_thw: np.ndarray, *, image_token_id: int, vision_start_id: int,
                       vision_end_id: int, merge_size: int = 2) -> np.ndarray:
    """Verify input_ids (S,) holds, per image, one `vision_start, pad x n_i, vision_end` run -> pad positions.

    Returns (sum_i n_i,) int32 positions of the image-pad tokens. Raises PromptError when the total count, the
    number of runs or any run's length disagrees with grid_thw, or a pad run is not framed by vision_start/end.
    """
    input_ids = np.asarray(input_ids)
    expected = num_image_tokens(grid_thw, merge_size=merge_size)
    positions = np.flatnonzero(input_ids == image_token_id).astype(np.int32)
    if len(positions) != int(expected.sum()):
        raise PromptError(f"prompt has {len(positions)} image-pad tokens but grid_thw {_as_grids(grid_thw).tolist()} "
                          f"needs {int(expected.sum())} ({expected.tolist()} per image)")
    if len(positions) == 0:
        return positions
    run_starts = np.concatenate([[0], np.flatnonzero(np.diff(positions) != 1) + 1])
    run_lengths = np.diff(np.concatenate([run_starts, [len(positions)]]))
    if len(run_lengths) != len(expected) or not np.array_equal(run_lengths, expected):
        raise PromptError(f"image-pad tokens form runs of lengths {run_lengths.tolist()}, but grid_thw needs "
                          f"{expected.tolist()} (one contiguous run per image)")
    for start, length in zip(positions[run_starts], run_lengths):
        end = start + length
        if start == 0 or input_ids[start - 1] != vision_start_id or end >= len(input_ids) \
                or input_ids[end] != vision_end_id:
            raise PromptError(f"image-pad run at tokens [{start}, {end}) is not framed by "
                              f"vision_start ({vision_start_id}) / vision_end ({vision_end_id})")
    return positions


def batch_prompts(prompts: Sequence[PromptTokens], *, pad_id: int, length: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad several prompts -> (input_ids (B, L) int32, attention_mask (B, L) bool).

    L = `length` (fixed, for jit) or the longest prompt. Raises PromptError when a prompt is longer than `length`.
    """
    longest = max(len(p.input_ids) for p in prompts)
    length = longest if length is None else int(length)
    if longest > length:
        raise PromptError(f"a prompt has {longest} tokens, more than length={length}")
    input_ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        input_ids[row, :len(prompt.input_ids)] = prompt.input_ids
        mask[row, :len(prompt.input_ids)] = True
    return input_ids, mask


def _as_grids(grid_thw) -> np.ndarray:
    grids = np.asarray(grid_thw, np.int64)
    if grids.size == 0:
        return grids.reshape(0, 3)
    if grids.ndim == 1:
        grids = grids.reshape(1, -1)
    if grids.ndim != 2 or grids.shape[1] != 3:
        raise PromptError(f"grid_thw must have shape (3,) or (num_images, 3), got {np.shape(grid_thw)}")
    return grids


def _backend(tokenizer) -> tokenizers.Tokenizer:
    if isinstance(tokenizer, tokenizers.Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, tokenizers.Tokenizer):
        return backend
    raise PromptError(f"expected a tokenizers.Tokenizer or a transformers fast tokenizer, got "
                      f"{type(tokenizer).__name__}")
