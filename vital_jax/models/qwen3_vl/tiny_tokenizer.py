"""A small offline Qwen-style tokenizer for tiny test and demo models (no download needed).

`build_tiny_tokenizer` trains a byte-level BPE with the `tokenizers` library on given texts, using Qwen2/3's text
pipeline (NFC, Qwen's pre-tokenisation regex, byte-level mapping), places the Qwen special tokens at fixed ids
(the tiny Qwen3-VL test config uses vision_start 188, vision_end 189, image_pad 190, video_pad 191 in a vocab of
200) and saves `tokenizer.json` + `tokenizer_config.json` with a Qwen3-VL chat template. The directory then works
with `prompt.load_tokenizer`, `transformers.AutoTokenizer.from_pretrained(dir)` and `Qwen3VLProcessor`, offline.

Differences from a real Qwen tokenizer, forced by a vocabulary of a few hundred ids: the byte alphabet is
printable ASCII, tab/newline/carriage return and the bytes present in the corpus, not all 256 bytes; any other
byte becomes `<unk>` (Qwen has no unknown token because it never needs one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

from vital_jax.models.qwen3_vl.prompt import (ENDOFTEXT, IM_END, IM_START, IMAGE_PAD, QWEN3_VL_CHAT_TEMPLATE,
                                              SPECIAL_TOKENS, VIDEO_PAD, VISION_END, VISION_START)

# Ids matching the tiny Qwen3VLConfig in the shared notes (vocab 200, image 190, video 191, vision start/end
# 188/189); the three chat tokens sit just below them.
TINY_SPECIAL_TOKEN_IDS = {
    ENDOFTEXT: 185, IM_START: 186, IM_END: 187,
    VISION_START: 188, VISION_END: 189, IMAGE_PAD: 190, VIDEO_PAD: 191,
}
UNK = "<unk>"

# Qwen2/Qwen3's pre-tokenisation regex (contractions, letter runs, single digits, punctuation runs, newlines,
# whitespace), as in their tokenizer.json.
_QWEN_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BASE_CHARS = "".join(chr(c) for c in range(0x20, 0x7F)) + "\t\n\r"


class TokenizerBuildError(ValueError):
    """The requested tiny tokenizer cannot be built (ids clash, vocabulary too small, no text)."""


def build_tiny_tokenizer(out_dir: str, corpus_texts: Iterable[str], vocab_size: int, *,
                         special_token_ids: Mapping[str, int] = TINY_SPECIAL_TOKEN_IDS,
                         model_max_length: int = 4096) -> tokenizers.Tokenizer:
    """Train a byte-level BPE on `corpus_texts`, pin the Qwen special tokens, save it to `out_dir`.

    vocab_size: total id space (the model's embedding rows). Special tokens take the ids in `special_token_ids`
      (all of SPECIAL_TOKENS must be given, each < vocab_size, no duplicates); `<unk>`, the byte alphabet and
      the learned merges fill the remaining ids in increasing order. A small corpus may learn fewer merges than
      fit; the unused ids then simply never occur.
    Writes tokenizer.json and tokenizer_config.json (eos `<|im_end|>`, pad `<|endoftext|>`, the Qwen3-VL chat
    template) and returns the tokenizers.Tokenizer.
    """
    special = dict(special_token_ids)
    missing = [t for t in SPECIAL_TOKENS if t not in special]
    if missing:
        raise TokenizerBuildError(f"special_token_ids lacks {missing}")
    unknown = [t for t in special if t not in SPECIAL_TOKENS]
    if unknown:
        raise TokenizerBuildError(f"special_token_ids has unknown tokens {unknown}; expected {list(SPECIAL_TOKENS)}")
    ids = list(special.values())
    if len(set(ids)) != len(ids) or any(not 0 <= i < vocab_size for i in ids):
        raise TokenizerBuildError(f"special token ids {special} must be distinct and in [0, {vocab_size})")
    texts = [t for t in corpus_texts if t]
    if not texts:
        raise TokenizerBuildError("corpus_texts is empty; the BPE needs text to learn from")

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    alphabet = sorted({piece for ch in _BASE_CHARS for piece, _ in byte_level.pre_tokenize_str(ch)})
    taken = set(ids)
    free_ids = [i for i in range(vocab_size) if i not in taken]
    if len(free_ids) < len(alphabet) + 1:
        raise TokenizerBuildError(f"vocab_size={vocab_size} leaves {len(free_ids)} ids after the special tokens, "
                                  f"fewer than the {len(alphabet) + 1} needed for <unk> and the byte alphabet")

    trained = tokenizers.Tokenizer(models.BPE(unk_token=UNK))
    _set_qwen_pipeline(trained)
    trainer = trainers.BpeTrainer(vocab_size=len(free_ids), special_tokens=[UNK], initial_alphabet=alphabet,
                                  show_progress=False)
    trained.train_from_iterator(texts, trainer)
    learned = sorted(trained.get_vocab().items(), key=lambda item: item[1])
    if len(learned) > len(free_ids):
        raise TokenizerBuildError(f"corpus alphabet needs {len(learned)} ids but only {len(free_ids)} are free; "
                                  f"raise vocab_size or use plainer text")

    # Rebuild the JSON with learned tokens moved onto the free ids and the specials at their pinned ids, both in
    # the model vocab and as special added tokens (so they are never split and decode can skip them).
    spec = json.loads(trained.to_str())
    vocab = {token: free_ids[rank] for rank, (token, _) in enumerate(learned)}
    vocab.update(special)
    spec["model"]["vocab"] = vocab
    spec["added_tokens"] = [
        dict(id=special[t], content=t, single_word=False, lstrip=False, rstrip=False, normalized=False,
             special=True) for t in sorted(special, key=special.get)]
    tokenizer = tokenizers.Tokenizer.from_str(json.dumps(spec))
    for token, token_id in special.items():
        if tokenizer.token_to_id(token) != token_id:
            raise TokenizerBuildError(f"{token} got id {tokenizer.token_to_id(token)} instead of {token_id}")

    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        # TokenizersBackend loads tokenizer.json as is; "Qwen2Tokenizer" would rebuild the BPE without <unk>.
        "tokenizer_class": "TokenizersBackend",
        "model_max_length": model_max_length,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": UNK,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "chat_template": QWEN3_VL_CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return tokenizer


def _set_qwen_pipeline(tokenizer: tokenizers.Tokenizer) -> None:
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
