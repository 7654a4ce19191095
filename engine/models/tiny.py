"""The embedded default: a tiny (~3M-parameter) Qwen2.5-VL-shaped model with a small BPE vocabulary.

Sized for CPU training on the bundled synthetic data: 224×224 images become 16×16 patches → 64 image tokens
(max_pixels = 224², so such images are not resized). The vocabulary is a 512-entry byte-level BPE with Qwen2's
pre-tokenisation, trained on the bundled training split's prompts and traces: SIF prompts and traces take about
2.3× fewer tokens than bytes (digits stay one token each, as in Qwen's vocabulary), which halves the cost of a step
and brings the question within ~100 tokens of the answer. Weights are drawn from a seeded generator and the BPE
training is deterministic, so the same seed gives byte-identical checkpoints. Nothing is downloaded.

``python -m engine.models.create_tiny OUT [--seed S]`` writes the random tiny default to a folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig, TextConfig, VisionConfig
from .loading import save_pretrained
from .model import VLModel
from .processor import DEFAULT_SYSTEM, ImageConfig, Processor
from .tokenizer import ENDOFTEXT, IM_END, IMAGE_PAD, VISION_END, VISION_START, Tokenizer, build_bpe_tokenizer

TINY_MAX_PIXELS = 224 * 224
TINY_VOCAB_SIZE = 512
TINY_ROPE_THETA = 5.0
"""The decoder's rotary base. M-RoPE gives the width axis the lowest frequencies of a head (the last
``mrope_section`` chunk): with 16 frequencies and base 10 000 they turn by at most 0.022 rad across the 8 columns of
a 224-px image, so no head can tell a left object from a right one. Base 5 turns them by 1.5–2.6 rad across the
grid (and the height axis by 2.8–4.7), still unambiguous for the lowest; text positions then repeat every ~28 tokens
in the slowest pair (``benchmarks/results/2026-12-07-cpu-rope-theta`` measures both sides)."""


def tiny_tokenizer() -> Tokenizer:
    """The embedded vocabulary: BPE trained on the bundled training split's SIF prompts, traces and chat roles."""
    from engine.data import bundled_dataset_dir
    from engine.data.schema import load_records
    from engine.data.sif_format import SIF_INSTRUCTION

    records, _ = load_records(bundled_dataset_dir("train") / "records.jsonl", check_files="none")
    corpus = [f"system\n{DEFAULT_SYSTEM}", "user\n", "assistant\n"]
    for r in records:
        corpus += [r.question + SIF_INSTRUCTION, r.response()]
    return Tokenizer(build_bpe_tokenizer(corpus, TINY_VOCAB_SIZE), "tiny BPE")


def tiny_config(tokenizer: Tokenizer | None = None) -> ModelConfig:
    """Config of the embedded default model; vocabulary size and special-token ids come from ``tokenizer``
    (default: :func:`tiny_tokenizer`)."""
    tok = tokenizer or tiny_tokenizer()
    text = TextConfig(
        vocab_size=len(tok),
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=TINY_ROPE_THETA,
        mrope_section=[4, 6, 6],
        max_position_embeddings=8192,
    )
    vision = VisionConfig(
        depth=4,
        hidden_size=128,
        intermediate_size=256,
        num_heads=4,
        out_hidden_size=192,
        window_size=112,
        fullatt_block_indexes=[1, 3],
    )
    t = tok.tok.token_to_id
    return ModelConfig(
        text=text,
        vision=vision,
        tie_word_embeddings=True,
        image_token_id=t(IMAGE_PAD),
        video_token_id=t("<|video_pad|>"),
        vision_start_token_id=t(VISION_START),
        vision_end_token_id=t(VISION_END),
        bos_token_id=t(ENDOFTEXT),
        eos_token_id=t(IM_END),
        torch_dtype="float32",
    )


def init_weights(model: nn.Module, seed: int, std: float | None = None) -> None:
    """Deterministic init: 0 for biases, 1 for norm weights, and N(0, std²) for matrices, embeddings and the patch
    conv, where ``std=None`` means 1/√fan_in of each (fan_in: every dimension but the first; an embedding's is
    the hidden size, so a token enters the residual stream at unit scale, like a normalised hidden state).

    Fan-in scaling, not the 0.02 of large checkpoints: at hidden size 192, std 0.02 leaves every attention head
    of the untrained model averaging its whole context, and a decoder this narrow then does not learn questions that
    need two facts together (``tests/test_tiny_init.py``; ``benchmarks.init_learning`` measures both inits).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                scale = std if std is not None else p.shape[1:].numel() ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def create_tiny_checkpoint(
    path: str | Path, seed: int = 0, config: ModelConfig | None = None, init_std: float | None = None
) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and preprocessor_config.json of the tiny model, or of a
    model of ``config`` (another shape, e.g. for benchmarks; its special-token ids must be the tiny tokenizer's)
    with random weights (:func:`init_weights`, ``init_std`` None: fan-in) and the tiny tokenizer and processor."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    model = VLModel(config or tiny_config(tok))
    init_weights(model, seed, init_std)
    save_pretrained(model, path)
    Processor(tok, ImageConfig(min_pixels=56 * 56, max_pixels=TINY_MAX_PIXELS)).save(path)
    return path
