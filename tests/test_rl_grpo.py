"""The packed GRPO objective has the gradient of a naive per-sequence computation on full logits."""

import pytest
import torch
from _toys import micro_config

from engine.models import ImageConfig, Processor, Tokenizer, VLModel
from engine.models.packing import pack_sequences
from engine.models.tiny import init_weights
from engine.models.tokenizer import build_byte_tokenizer
from engine.rl.grpo import GRPOMicroBatch, GRPOObjective, RLConfig


@pytest.fixture(scope="module")
def tiny():
    tok = Tokenizer(build_byte_tokenizer())
    cfg = micro_config(tok)
    model = VLModel(cfg)
    init_weights(model, seed=0, std=0.2)  # a peaked policy, so ratios and KL are far from trivial
    processor = Processor(tok, ImageConfig(min_pixels=56 * 56, max_pixels=56 * 56))
    return model, processor, cfg


def _sequences(processor: Processor, cfg, gen: torch.Generator):
    """Three rollouts: text-only completions of different lengths, one with a crop view spliced mid-completion."""
    image = torch.randint(0, 256, (64, 48, 3), dtype=torch.uint8, generator=gen)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "where?"}]}]
    prompt = processor.apply_chat_template(messages, [image], add_generation_prompt=True)
    crop_pv, crop_grid = processor.preprocess_images([torch.rand(3, 56, 56, generator=gen)])
    vision = [cfg.vision_start_token_id] + [cfg.image_token_id] * int(crop_grid.prod() // 4) + [cfg.vision_end_token_id]
    seqs = []
    for n, splice in ((7, False), (12, True), (3, False)):
        done = torch.randint(40, 120, (n,), generator=gen)
        parts = [prompt["input_ids"], done[: n // 2]]
        mask = [torch.zeros(len(prompt["input_ids"]), dtype=torch.bool), torch.ones(n // 2, dtype=torch.bool)]
        pv, grid = prompt["pixel_values"], prompt["image_grid_thw"]
        if splice:
            parts.append(torch.tensor(vision))
            mask.append(torch.zeros(len(vision), dtype=torch.bool))
            pv, grid = torch.cat([pv, crop_pv]), torch.cat([grid, crop_grid])
        parts.append(done[n // 2 :])
        mask.append(torch.ones(n - n // 2, dtype=torch.bool))
        seqs.append((torch.cat(parts), torch.cat(mask), pv, grid))
    return seqs


def _naive_loss(model, seqs, adv, old, ref, rl: RLConfig) -> torch.Tensor:
    """TRL's GRPO formula written out per sequence on full [T, V] logits."""
    per_seq, tokens = [], []
    for b, (ids, mask, pv, grid) in enumerate(seqs):
        logits = model.logits(ids[None], pixel_values=pv, image_grid_thw=grid)[0].float() / rl.temperature
        pos = mask.nonzero().squeeze(1)
        lp = torch.log_softmax(logits, -1)[pos - 1, ids[pos]]
        n = len(pos)
        ratio = torch.exp(lp - old[b, :n])
        clipped = torch.clamp(ratio, 1 - rl.epsilon, 1 + rl.epsilon_high)
        loss = -torch.min(ratio * adv[b], clipped * adv[b])
        diff = ref[b, :n] - lp
        loss = loss + rl.beta * (torch.exp(diff) - diff - 1)
        per_seq.append(loss.mean())
        tokens.append(loss)
    if rl.loss_type == "grpo":
        return torch.stack(per_seq).mean()
    return torch.cat(tokens).mean()  # bnpo


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo"])
def test_packed_objective_gradient_matches_naive(tiny, loss_type: str) -> None:
    model, processor, cfg = tiny
    gen = torch.Generator().manual_seed(0)
    seqs = _sequences(processor, cfg, gen)
    rl = RLConfig(num_generations=3, beta=0.1, epsilon=0.2, epsilon_high=0.28, temperature=0.7, loss_type=loss_type)
    packed = pack_sequences([s[0] for s in seqs], [s[1] for s in seqs], cfg, [s[2] for s in seqs], [s[3] for s in seqs])
    assert packed.mask.sum(1).tolist() == [7, 12, 3]
    adv = torch.tensor([1.0, -0.5, 2.0])
    with torch.no_grad():  # old/ref: the current policy shifted by ±0.4 nats, so some ratios leave [1-ε, 1+ε]
        shift = (torch.rand(packed.mask.shape, generator=gen) - 0.5) * 0.8
        lp0 = torch.zeros(packed.mask.shape)
        for b, (ids, mask, pv, grid) in enumerate(seqs):
            logits = model.logits(ids[None], pixel_values=pv, image_grid_thw=grid)[0].float() / rl.temperature
            pos = mask.nonzero().squeeze(1)
            lp0[b, : len(pos)] = torch.log_softmax(logits, -1)[pos - 1, ids[pos]]
        old = (lp0 + shift) * packed.mask
        ref = (lp0 - shift.flip(1)) * packed.mask

    model.zero_grad()
    _naive_loss(model, seqs, adv, old, ref, rl).backward()
    naive = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    out = GRPOObjective(rl)(model, GRPOMicroBatch(packed, adv, old, ref))
    (out.loss_sum / out.num_loss_units).backward()
    expected_units = 3 if loss_type == "grpo" else 22
    assert float(out.num_loss_units) == expected_units
    assert out.metrics["clip_fraction"] > 0
    for name, p in model.named_parameters():
        torch.testing.assert_close(
            p.grad,
            naive[name],
            rtol=2e-4,
            atol=1e-5 * float(naive[name].abs().max()),
            msg=lambda m, n=name: f"{n}: {m}",
        )


def test_pack_sequences_layout(tiny) -> None:
    _, _, cfg = tiny
    a = torch.tensor([5, 6, 7, 8])
    b = torch.tensor([9, 10, 11])
    packed = pack_sequences([a, b], [torch.tensor([False, False, True, True]), torch.tensor([False, True, True])], cfg)
    assert packed.cu_seqlens.tolist() == [0, 4, 7]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert packed.source_rows.tolist() == [1, 2, 4, 5]  # each target is predicted from the previous position
    assert packed.target_ids.tolist() == [7, 8, 10, 11]
    assert packed.mask.tolist() == [[True, True], [True, True]]
    torch.testing.assert_close(
        packed.scatter(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    )
    with pytest.raises(ValueError, match="sequence 1"):
        pack_sequences([a, b], [torch.zeros(4, dtype=torch.bool), torch.tensor([True, False, False])], cfg)
