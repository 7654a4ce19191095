"""Image preprocessing against transformers' Qwen2-VL (PIL) image processor, the chat template, vocabularies."""

import math

import numpy as np
import pytest
import torch

from engine.data import bundled_dataset_dir
from engine.data.schema import load_records
from engine.data.sif_format import SIF_INSTRUCTION
from engine.models import ImageConfig, Processor, Tokenizer, smart_resize
from engine.models.tiny import TINY_VOCAB_SIZE, tiny_tokenizer
from engine.models.tokenizer import build_byte_tokenizer

TOK = Tokenizer(build_byte_tokenizer())


def naive_smart_resize(h, w, factor, lo, hi):
    """Independent statement: nearest multiples of factor, then scale into [lo, hi] pixels keeping aspect."""
    hb, wb = factor * round(h / factor), factor * round(w / factor)
    if hb * wb > hi:
        s = math.sqrt(h * w / hi)
        return max(factor, factor * math.floor(h / s / factor)), max(factor, factor * math.floor(w / s / factor))
    if hb * wb < lo:
        s = math.sqrt(lo / (h * w))
        return factor * math.ceil(h * s / factor), factor * math.ceil(w * s / factor)
    return hb, wb


@pytest.mark.parametrize("size", [(1, 1), (27, 29), (100, 150), (224, 224), (300, 500), (1000, 20), (4000, 3000)])
def test_smart_resize_properties(size):
    h, w = size
    lo, hi = 56 * 56, 224 * 224
    th, tw = smart_resize(h, w, 28, lo, hi)
    assert (th, tw) == naive_smart_resize(h, w, 28, lo, hi)
    assert th % 28 == 0 and tw % 28 == 0
    assert th * tw <= hi or min(th, tw) == 28


def test_preprocessing_matches_transformers():
    pil_mod = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    proc = Processor(TOK, ImageConfig(min_pixels=56 * 56, max_pixels=300 * 300))
    ref_proc = pil_mod.Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=300 * 300)
    gen = torch.Generator().manual_seed(0)
    images = [
        torch.randint(0, 256, s, dtype=torch.uint8, generator=gen)
        for s in [(100, 150, 3), (224, 224, 3), (400, 250, 3), (30, 40, 3)]
    ]
    ref = ref_proc(images=[im.numpy() for im in images], return_tensors="pt")
    pv, grid = proc.preprocess_images(images)
    assert grid.tolist() == ref["image_grid_thw"].tolist()
    torch.testing.assert_close(pv, ref["pixel_values"], atol=1e-5, rtol=0)


def test_patch_layout_independent_numpy():
    """A float image already at target size: patches equal a plain numpy patchify of the normalised image."""
    proc = Processor(TOK)
    img = torch.rand(3, 56, 84, generator=torch.Generator().manual_seed(1))
    pv, grid = proc.preprocess_image(img)
    assert grid == (1, 4, 6)
    x = (img.numpy() - np.array(proc.image.image_mean)[:, None, None]) / np.array(proc.image.image_std)[:, None, None]
    rows = []
    for by in range(2):  # merge windows in row-major order, 2x2 patches inside each
        for bx in range(3):
            for my in range(2):
                for mx in range(2):
                    y, xx = (by * 2 + my) * 14, (bx * 2 + mx) * 14
                    p = x[:, y : y + 14, xx : xx + 14]
                    rows.append(np.stack([p, p], axis=1).reshape(-1))  # (C, T=2, 14, 14)
    np.testing.assert_allclose(pv.numpy(), np.stack(rows), atol=1e-5)


def test_chat_template_and_assistant_mask():
    proc = Processor(TOK, ImageConfig(max_pixels=56 * 56))
    image = torch.randint(0, 256, (56, 56, 3), dtype=torch.uint8)
    msgs = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "text", "text": "Q?"}],
        },
        {"role": "assistant", "content": "<answer>ok</answer>"},
    ]
    out = proc.apply_chat_template(msgs, [image])
    text = TOK.decode(out["input_ids"].tolist())
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nLook: <|vision_start|>"
        + "<|image_pad|>" * 4
        + "<|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\n<answer>ok</answer><|im_end|>\n"
    )
    assert text == expected
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert int((out["input_ids"] == TOK.image_pad_id).sum()) == 4
    assert TOK.decode(out["input_ids"][out["assistant_mask"]].tolist()) == "<answer>ok</answer><|im_end|>"
    prompt = proc.apply_chat_template(msgs[:1], [image], add_generation_prompt=True)
    assert "assistant_mask" not in prompt
    assert TOK.decode(prompt["input_ids"].tolist()).endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="1 image parts but 0 images"):
        proc.apply_chat_template(msgs, [])


def test_byte_tokenizer_round_trip():
    text = 'Depth: <area>[{"bbox_2d":[0.1,0.2,0.5,0.9],"depth":0.25}]</area> é 深'
    ids = TOK.encode(text)
    assert len(TOK) == 278 and max(ids) < 256 and len(ids) == len(text.encode())
    assert TOK.decode(ids) == text
    assert TOK.encode("<|im_end|>") == [TOK.im_end_id]


def test_tiny_bpe_vocabulary_round_trips_and_shortens_sif_text():
    """The embedded BPE: any text (unseen bytes too) round-trips, digits stay single tokens as in Qwen's vocabulary,
    special tokens keep one id, and a bundled prompt text and trace take far fewer tokens than bytes."""
    tok = tiny_tokenizer()
    text = 'Depth: <area>[{"bbox_2d":[0.1,0.2,0.5,0.9],"depth":0.25}]</area> é 深 1234'
    assert tok.decode(tok.encode(text)) == text
    assert [tok.decode([i]) for i in tok.encode("1234")] == ["1", "2", "3", "4"]
    assert tok.encode("<|im_end|>") == [tok.im_end_id] and tok.encode("<|image_pad|>") == [tok.image_pad_id]
    records, _ = load_records(bundled_dataset_dir("train") / "records.jsonl", check_files="none")
    prompt, response = records[0].question + SIF_INSTRUCTION, records[0].response()
    assert len(tok.encode(prompt)) <= 0.3 * len(prompt.encode())
    assert len(tok.encode(response)) <= 0.55 * len(response.encode())
    assert 256 < len(tok) <= TINY_VOCAB_SIZE + 22
