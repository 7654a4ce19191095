"""Our model against transformers' Qwen2_5_VLForConditionalGeneration on tiny random checkpoints (fp32).

transformers is the test-only oracle: it builds and saves the checkpoint (safetensors), we load it with our own
loader, and logits must agree within 1e-4 for text-only, one image, several images of different sizes and packed
batches; greedy generation must produce the same tokens.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")  # v5 API (mm_token_type_ids)

from engine.models import (  # noqa: E402
    Processor,
    Tokenizer,
    create_tiny_checkpoint,
    from_pretrained,
    generate,
    mrope_position_ids,
)
from engine.models.tokenizer import build_byte_tokenizer  # noqa: E402

TOK = Tokenizer(build_byte_tokenizer())
IMG, VS, VE = TOK.image_pad_id, TOK.vision_start_id, TOK.vision_end_id
ATOL = 1e-4


def hf_config(tie: bool = False):
    return transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(TOK),
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            rope_theta=10000.0,
            max_position_embeddings=2048,
            rms_norm_eps=1e-6,
            initializer_range=0.2,
            bos_token_id=None,
            eos_token_id=TOK.im_end_id,
            pad_token_id=TOK.endoftext_id,
        ),
        vision_config=dict(
            depth=3,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            out_hidden_size=64,
            window_size=56,
            fullatt_block_indexes=[1],
            initializer_range=0.2,
        ),
        image_token_id=IMG,
        video_token_id=TOK.tok.token_to_id("<|video_pad|>"),
        vision_start_token_id=VS,
        vision_end_token_id=VE,
        tie_word_embeddings=tie,
    )


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(hf model, our model) loaded from the same HF-written checkpoint."""
    torch.manual_seed(0)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(hf_config()).eval()
    path = tmp_path_factory.mktemp("hf_ckpt")
    hf.save_pretrained(path)
    return hf, from_pretrained(path)


def image_tokens(grid):
    return [VS] + [IMG] * (int(grid.prod()) // 4) + [VE]


def hf_logits(hf, ids, mask=None, pv=None, grid=None, image_token_id=IMG):
    with torch.no_grad():
        return hf(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=pv,
            image_grid_thw=grid,
            mm_token_type_ids=(ids == image_token_id).int(),
        ).logits


def test_text_only(pair):
    hf, ours = pair
    ids = torch.randint(0, 250, (2, 23), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(hf, ids)
    with torch.no_grad():
        got = ours.logits(ids)
    assert ref.abs().max() > 1.0  # not a degenerate model
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("grids", [[[1, 6, 10]], [[1, 6, 10], [1, 4, 4], [1, 8, 6]]], ids=["one", "several"])
def test_images(pair, grids):
    hf, ours = pair
    gen = torch.Generator().manual_seed(2)
    grid = torch.tensor(grids)
    pv = torch.randn(int(grid.prod(-1).sum()), 1176, generator=gen)
    seq = torch.randint(0, 250, (3,), generator=gen).tolist()
    for g in grid:
        seq += image_tokens(g) + torch.randint(0, 250, (4,), generator=gen).tolist()
    ids = torch.tensor([seq])
    ref = hf_logits(hf, ids, pv=pv, grid=grid)
    with torch.no_grad():
        got = ours.logits(ids, pixel_values=pv, image_grid_thw=grid)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_packed_batch_matches_padded_hf(pair):
    """Three sequences (text, one image, two images) of different lengths: HF left-padded batch vs our packed
    forward and our padded ``logits``."""
    hf, ours = pair
    gen = torch.Generator().manual_seed(3)
    grids = torch.tensor([[1, 4, 6], [1, 6, 4], [1, 4, 4]])
    pv = torch.randn(int(grids.prod(-1).sum()), 1176, generator=gen)
    r = lambda n: torch.randint(0, 250, (n,), generator=gen).tolist()
    seqs = [r(9), r(2) + image_tokens(grids[0]) + r(5), r(3) + image_tokens(grids[1]) + r(1) + image_tokens(grids[2])]
    width = max(map(len, seqs))
    ids = torch.full((3, width), TOK.endoftext_id)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    ref = hf_logits(hf, ids, mask, pv, grids)
    with torch.no_grad():
        got = ours.logits(ids, mask, pv, grids)
        flat = torch.tensor([t for s in seqs for t in s])
        pos = torch.cat(
            [
                mrope_position_ids(torch.tensor(seqs[0]), None, ours.config),
                mrope_position_ids(torch.tensor(seqs[1]), grids[:1], ours.config),
                mrope_position_ids(torch.tensor(seqs[2]), grids[1:], ours.config),
            ],
            dim=1,
        )
        cu = torch.tensor([0, len(seqs[0]), len(seqs[0]) + len(seqs[1]), len(flat)], dtype=torch.int32)
        packed = ours.forward_packed(flat, pos, cu, pv, grids) @ ours.lm_head_weight.T
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], atol=ATOL, rtol=0)
    torch.testing.assert_close(packed, ref[valid], atol=ATOL, rtol=0)


def test_rope_index_matches_hf(pair):
    hf, ours = pair
    grids = torch.tensor([[1, 4, 6], [1, 8, 4]])
    seq = [1, 2] + image_tokens(grids[0]) + [3] + image_tokens(grids[1]) + [4, 5, 6]
    ids = torch.tensor([seq])
    ref, _ = hf.model.get_rope_index(ids, (ids == IMG).int(), image_grid_thw=grids)
    torch.testing.assert_close(mrope_position_ids(ids[0], grids, ours.config), ref[:, 0])


def test_tied_tiny_checkpoint_loads_in_hf(tmp_path):
    """Our tiny default (tied embeddings, flat hub config) is a valid Qwen2.5-VL checkpoint for transformers."""
    path = create_tiny_checkpoint(tmp_path / "tiny", seed=0)
    ours = from_pretrained(path)
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    assert ours.lm_head_weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    tok = Tokenizer.from_file(path)  # the tiny BPE: its special-token ids are not the byte vocabulary's
    grid = torch.tensor([[1, 8, 8]])
    pv = torch.randn(64, 1176, generator=torch.Generator().manual_seed(4))
    vision = [tok.vision_start_id] + [tok.image_pad_id] * (int(grid.prod()) // 4) + [tok.vision_end_id]
    ids = torch.tensor([[tok.im_start_id, 10, 11] + vision + [12, 13]])
    with torch.no_grad():
        got = ours.logits(ids, pixel_values=pv, image_grid_thw=grid)
    ref = hf_logits(hf, ids, pv=pv, grid=grid, image_token_id=tok.image_pad_id)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


def test_greedy_generation_matches_hf(pair):
    hf, ours = pair
    proc = Processor(TOK)
    gen = torch.Generator().manual_seed(5)
    image = torch.randint(0, 256, (60, 90, 3), dtype=torch.uint8, generator=gen)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is it?"}]}]
    prompts = [
        proc.apply_chat_template(msgs, [image], add_generation_prompt=True),
        proc.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True),
    ]
    rollouts = generate(ours, proc, prompts, num_samples=1, max_new_tokens=12, temperature=0.0)
    assert sum(int(r.completion_mask.sum()) for r in rollouts) > 12  # more than an immediate eos
    for p, r in zip(prompts, rollouts):
        ids = p["input_ids"].unsqueeze(0)
        vision = {}
        if p["pixel_values"] is not None:
            vision = dict(
                pixel_values=p["pixel_values"], image_grid_thw=p["image_grid_thw"], mm_token_type_ids=(ids == IMG).int()
            )
        with torch.no_grad():
            out = hf.generate(
                **vision,
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=list(TOK.eos_token_ids),
                pad_token_id=TOK.endoftext_id,
            )
        new = out[0, ids.shape[1] :]
        new = new[: int((new != TOK.endoftext_id).sum())] if r.finished else new
        assert r.input_ids[r.completion_mask].tolist() == new.tolist()
