"""SFT objective: chunked CE equals full CE; the loss covers exactly the assistant tokens of a SIF conversation."""

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _toys import micro_config, toy_record

from engine.models import ImageConfig, Processor, Tokenizer, VLModel
from engine.models.tiny import init_weights
from engine.models.tokenizer import build_byte_tokenizer
from engine.train.sft import SFTDataset, SFTObjective, SFTViews, chunked_cross_entropy, collate_sft


def test_chunked_cross_entropy_matches_full_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    target = torch.randint(0, 50, (37,), generator=gen)
    full = F.cross_entropy(hidden @ weight.T, target, reduction="sum")
    g_full = torch.autograd.grad(full, (hidden, weight))
    chunked = chunked_cross_entropy(hidden, weight, target, chunk_rows=8)
    g_chunked = torch.autograd.grad(chunked, (hidden, weight))
    torch.testing.assert_close(chunked, full)
    for a, b in zip(g_chunked, g_full):
        torch.testing.assert_close(a, b)


def test_sft_loss_is_ce_over_assistant_tokens(tmp_path: Path) -> None:
    tok = Tokenizer(build_byte_tokenizer())
    cfg = micro_config(tok)
    model = VLModel(cfg)
    init_weights(model, seed=0, std=0.1)
    processor = Processor(tok, ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56))
    data = SFTDataset([toy_record(tmp_path, 0), toy_record(tmp_path, 1)], processor, with_depth=True, max_seq_len=4096)
    examples = [data[0], data[1]]
    response = data.records[0].response()
    assert examples[0].assistant_mask.sum() == len(response) + 1  # byte tokens of the trace + <|im_end|>
    assert examples[0].image_grid_thw.shape[0] == 2  # RGB + depth image

    out = SFTObjective()(model, collate_sft(examples, cfg))
    expected, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logits = model.logits(e.input_ids[None], pixel_values=e.pixel_values, image_grid_thw=e.image_grid_thw)[0]
            pos = e.assistant_mask.nonzero().squeeze(1)
            expected += F.cross_entropy(logits[pos - 1].float(), e.input_ids[pos], reduction="sum")
            count += len(pos)
    assert out.num_loss_units == count
    torch.testing.assert_close(out.loss_sum.detach(), torch.as_tensor(expected), rtol=1e-5, atol=1e-4)


def test_sft_errors_name_the_record(tmp_path: Path) -> None:
    tok = Tokenizer(build_byte_tokenizer())
    processor = Processor(tok, ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56))
    with pytest.raises(ValueError, match="r3"):
        SFTDataset([toy_record(tmp_path, 3, with_trace=False)], processor, with_depth=True, max_seq_len=64)
    data = SFTDataset([toy_record(tmp_path, 4)], processor, with_depth=True, max_seq_len=10)
    with pytest.raises(ValueError, match="r4.*inside an image"):
        data[0]
    assert len(SFTDataset([toy_record(tmp_path, 5)], processor, with_depth=True, max_seq_len=150)[0].input_ids) == 150


def test_crop_mode_traces_carry_views_that_are_never_scored(tmp_path: Path) -> None:
    tok = Tokenizer(build_byte_tokenizer())
    cfg = micro_config(tok)
    processor = Processor(tok, ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56))
    record = toy_record(tmp_path, 6)
    views = SFTViews(focus_mode="crop", max_views=4, crop_size=56)
    text = SFTDataset([record], processor, with_depth=True, max_seq_len=4096)[0]
    crop = SFTDataset([record], processor, with_depth=True, max_seq_len=4096, views=views)[0]
    # two areas of one box each -> an RGB and a depth view after each </area>: 2 prompt images + 4 views
    assert crop.image_grid_thw.shape[0] == 6
    assert crop.image_grid_thw[2:].tolist() == [[1, 4, 4]] * 4  # 56 x 56 views
    vision = torch.isin(crop.input_ids, torch.tensor([tok.vision_start_id, tok.image_pad_id, tok.vision_end_id]))
    assert not bool((crop.assistant_mask & vision).any())
    assert int(crop.assistant_mask.sum()) == int(text.assistant_mask.sum())  # the same trace bytes are scored
    ends = (crop.input_ids == tok.vision_end_id).nonzero().squeeze(1).tolist()
    starts = (crop.input_ids == tok.vision_start_id).nonzero().squeeze(1).tolist()
    assert tok.decode(crop.input_ids[starts[2] - 7 : starts[2]].tolist()) == "</area>"  # views follow an area
    assert tok.decode(crop.input_ids[ends[3] + 1 : ends[3] + 7].tolist()) == "<text>"
    model = VLModel(cfg)
    init_weights(model, seed=0, std=0.1)
    out = SFTObjective()(model, collate_sft([crop], cfg))
    assert torch.isfinite(out.loss_sum) and out.num_loss_units == int(crop.assistant_mask.sum())


def test_collate_puts_every_tensor_of_the_batch_on_the_training_device(tmp_path: Path) -> None:
    """The objective indexes the model's output with ``source_rows``: on GPU it must not be left on the CPU."""
    tok = Tokenizer(build_byte_tokenizer())
    cfg = micro_config(tok)
    processor = Processor(tok, ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56))
    data = SFTDataset([toy_record(tmp_path, 0)], processor, with_depth=True, max_seq_len=4096)
    packed = collate_sft([data[0]], cfg, device="meta")
    tensors = {f.name: getattr(packed, f.name) for f in dataclasses.fields(packed)}
    assert all(t.is_meta for t in tensors.values() if t is not None), {k: t.device for k, t in tensors.items()}
    assert collate_sft([data[0]], cfg).source_rows.device.type == "cpu"


@pytest.mark.parametrize("focus_mode", ["text", "crop"])
def test_sft_prompt_is_the_prompt_the_policy_is_sampled_on(tmp_path: Path, focus_mode: str) -> None:
    """By default an SFT conversation starts with exactly the tokens and images of the rollout prompt of the same
    focusing mode (text mode shows no depth image); SFT on a prompt the policy never sees was a silent mismatch."""
    from engine.config import DataConfig
    from engine.rl.grpo import RLConfig
    from engine.rl.prompts import build_prompt
    from engine.train.sft import prompt_shows_depth

    tok = Tokenizer(build_byte_tokenizer())
    processor = Processor(tok, ImageConfig(min_pixels=28 * 28, max_pixels=56 * 56))
    record = toy_record(tmp_path, 0)
    views = SFTViews(focus_mode)
    with_depth = prompt_shows_depth(DataConfig().with_depth, views)
    example = SFTDataset([record], processor, with_depth=with_depth, max_seq_len=4096, views=views)[0]
    prompt = build_prompt(record, processor, with_depth=RLConfig(focus_mode=focus_mode).depth_in_prompt).inputs
    n = prompt["input_ids"].numel()
    assert torch.equal(example.input_ids[:n], prompt["input_ids"])
    prompt_patches = prompt["pixel_values"].shape[0]
    torch.testing.assert_close(example.pixel_values[:prompt_patches], prompt["pixel_values"])
    assert with_depth == (focus_mode == "crop")
    assert prompt_shows_depth(True, SFTViews("text")) and not prompt_shows_depth(False, SFTViews("crop"))
