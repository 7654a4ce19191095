"""Vision-language alignment of a randomly initialised vision tower, from the generator's scene descriptions.

A pretrained VLM starts from a vision tower whose tokens already say what they show; the tiny default starts from
random weights, and its decoder then has to discover, through the SFT loss alone, which continuous patch features go
with which words. It learns that for one-object scenes ("What color is the object?") but not for questions that
match a word of the question against one object among several ("Is there a red object?": it stays at chance).
Given image tokens that equal fixed vectors per colour it learns the same question in a few hundred steps
(``benchmarks.vision_learning`` measures both).

This stage gives the tower that property before any SFT: every image token regresses (mean squared error) onto the
decoder's own input embedding of the words naming what its patch shows, ``e(colour) + e(shape)`` of the nearest
object there (``token_words``), else ``e(background)``, where ``e(w)`` is the mean embedding of the BPE
pieces of " w". It is the feature-alignment stage of LLaVA-style training, with the synthetic scenes' exact labels
in place of captions. Only the tower (patch embedding, blocks, merger) trains; the embeddings are read once.
With ``position_weight`` > 0 each target also holds a fixed code of the token's cell (:func:`position_code`), so
that the tokens say where they are as well as what they show.

Labels come from ``record.meta["scene"]["objects"]`` (``engine.data.synth`` writes them: ``box``, ``color``,
``shape``, ``center``); a record without them is refused with its id.

    python -m engine.train.vision_align --data DIR --model CKPT --out ALIGNED --steps 300
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.data.images import load_image
from engine.data.schema import Record, load_records
from engine.models import VLModel, from_pretrained, processor_from_pretrained
from engine.models.loading import save_pretrained
from engine.models.processor import Processor

BACKGROUND = "background"


@dataclass
class AlignConfig:
    """AdamW on the vision tower alone: ``steps`` batches of ``batch_size`` images (drawn with ``seed``), linear
    warm-up over ``warmup`` steps, then a constant ``lr``; ``position_weight`` x :func:`position_code` is added to
    every target (0: what each token shows, not where). ``balanced``: a batch's object tokens weigh as much in the
    loss as its background tokens (:func:`balanced_mean`), instead of one token one vote."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 20
    seed: int = 0
    position_weight: float = 0.0
    balanced: bool = False


def scene_objects(record: Record) -> list[dict]:
    """The objects of the record's scene description (``meta.scene.objects``), each with box, colour, shape and
    centre; ValueError naming the record when the description is missing or incomplete."""
    objects = (record.meta or {}).get("scene", {}).get("objects")
    if not isinstance(objects, list):
        raise ValueError(f"record {record.id}: vision alignment needs meta.scene.objects (the generator's scene)")
    for i, o in enumerate(objects):
        missing = sorted({"box", "color", "shape", "center"} - set(o))
        if missing:
            raise ValueError(f"record {record.id}: meta.scene.objects[{i}] lacks {missing}")
    return objects


def token_words(objects: list[dict], grid_h: int, grid_w: int) -> list[str]:
    """Per image token, row-major over its ``grid_h`` x ``grid_w`` grid: "colour shape" of the nearest object (view
    depth ``center[2]``) whose box holds the token's centre or whose box centre lies in the token's cell, else
    ``BACKGROUND``. The second rule gives an object smaller than a cell the cell it sits in: by token centres alone
    a third of the default framing's objects (median box 1.3 % of the image, a token's cell 1.6 %) had no token."""
    nearest_first = sorted(objects, key=lambda o: o["center"][2])

    def home_cell(box: list[float]) -> tuple[int, int]:
        """(row, column) of the cell holding the box's centre."""
        cy, cx = (box[1] + box[3]) / 2 * grid_h, (box[0] + box[2]) / 2 * grid_w
        return min(int(cy), grid_h - 1), min(int(cx), grid_w - 1)

    homes = [home_cell(o["box"]) for o in nearest_first]
    words = []
    for i in range(grid_h):
        y = (i + 0.5) / grid_h
        for j in range(grid_w):
            x = (j + 0.5) / grid_w
            hit = next(
                (
                    o
                    for o, home in zip(nearest_first, homes)
                    if home == (i, j) or (o["box"][0] <= x <= o["box"][2] and o["box"][1] <= y <= o["box"][3])
                ),
                None,
            )
            words.append(f"{hit['color']} {hit['shape']}" if hit else BACKGROUND)
    return words


def phrase_embedding(phrase: str, embeddings: torch.Tensor, processor: Processor) -> torch.Tensor:
    """float32 [D]: the sum over the phrase's words of the mean input embedding of the BPE pieces of " word"."""
    rows = [embeddings[processor.tokenizer.encode(" " + w)].mean(0) for w in phrase.split()]
    return torch.stack(rows).sum(0).float()


POSITION_FREQUENCIES = 4
"""Frequencies of :func:`position_code` per axis: periods of 2, 1, 2/3 and 1/2 of the view."""


@functools.lru_cache(maxsize=64)
def position_code(grid_h: int, grid_w: int, dim: int, frequencies: int = POSITION_FREQUENCIES) -> torch.Tensor:
    """float32 [grid_h * grid_w, dim], row-major: a fixed 2-D sinusoidal code of each token's centre (x, y in [0, 1]
    of the view), cos/sin(π m x) and cos/sin(π m y) for m = 1..``frequencies``, mapped into ``dim`` by fixed
    orthonormal columns (seed 0) and scaled to unit norm, about one word embedding's norm at the tiny init.
    Computed once per grid and shared: callers must not write into it.

    RoPE moves an image token's position into attention *scores* only; a head that finds "the red cube" by its
    content returns what the cube looks like, not where it is. With this code in its tokens the same head returns
    the position too. ``benchmarks.vision_learning --oracle-tower --oracle-position W`` measures what that is worth
    to the decoder; the recipes' alignment adds it with ``model.align_position_weight`` (default 0: left out)."""
    if 4 * frequencies > dim:
        raise ValueError(f"position code: {4 * frequencies} features do not fit {dim} dimensions")
    ys = (torch.arange(grid_h, dtype=torch.float64) + 0.5) / grid_h
    xs = (torch.arange(grid_w, dtype=torch.float64) + 0.5) / grid_w
    y, x = (g.reshape(-1) for g in torch.meshgrid(ys, xs, indexing="ij"))
    m = torch.arange(1, frequencies + 1, dtype=torch.float64) * math.pi
    features = torch.cat(
        [torch.cos(x[:, None] * m), torch.sin(x[:, None] * m), torch.cos(y[:, None] * m), torch.sin(y[:, None] * m)],
        dim=1,
    )
    basis, _ = torch.linalg.qr(
        torch.randn(dim, 4 * frequencies, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    )
    return (features @ basis.T / math.sqrt(2 * frequencies)).float()


class PhraseTargets:
    """The target of every image token of a record: its phrase's embedding (each phrase computed once), plus
    ``position_weight`` x :func:`position_code` of its place in the grid."""

    def __init__(self, embeddings: torch.Tensor, processor: Processor, position_weight: float = 0.0) -> None:
        self.embeddings = embeddings
        self.processor = processor
        self.position_weight = position_weight
        self.phrases: dict[str, torch.Tensor] = {}

    def __call__(self, record: Record, grid_h: int, grid_w: int) -> torch.Tensor:
        """float32 [grid_h * grid_w, D]: the record's image tokens, row-major over their ``grid_h`` x ``grid_w``
        grid."""
        return self.of_words(token_words(scene_objects(record), grid_h, grid_w), grid_h, grid_w)

    def of_words(self, words: list[str], grid_h: int, grid_w: int) -> torch.Tensor:
        """float32 [grid_h * grid_w, D]: the targets of tokens labelled ``words`` (:func:`token_words`)."""
        for w in set(words) - set(self.phrases):
            self.phrases[w] = phrase_embedding(w, self.embeddings, self.processor)
        targets = torch.stack([self.phrases[w] for w in words])
        if self.position_weight:
            targets = targets + self.position_weight * position_code(grid_h, grid_w, targets.shape[1])
        return targets


class AlignmentTargets:
    """Each record's image (uint8, loaded once) and its tokens' target embeddings float32 [tokens, D]."""

    def __init__(
        self, records: list[Record], model: VLModel, processor: Processor, position_weight: float = 0.0
    ) -> None:
        self.processor = processor
        self.targets = PhraseTargets(model.model.embed_tokens.weight.detach().float().cpu(), processor, position_weight)
        self.items: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.grids: list[tuple[int, int]] = []  # each image's token grid (rows, columns)
        self.backgrounds: list[torch.Tensor] = []  # each image's tokens that show no object, bool [tokens]
        for r in records:
            rgb = load_image(r.image)
            height, width = processor.target_size(rgb.shape[0], rgb.shape[1])  # the size the processor resizes to
            self.grids.append((height // processor.factor, width // processor.factor))
            words = token_words(scene_objects(r), *self.grids[-1])
            self.items.append((rgb, self.targets.of_words(words, *self.grids[-1])))
            self.backgrounds.append(torch.tensor([w == BACKGROUND for w in words]))

    def background(self, indices: list[int]) -> torch.Tensor:
        """bool [tokens]: which image tokens of ``indices`` (in :meth:`batch` order) show no object."""
        return torch.cat([self.backgrounds[i] for i in indices])

    @property
    def phrases(self) -> dict[str, torch.Tensor]:
        return self.targets.phrases

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pixel_values [P, patch_dim], image_grid_thw [n, 3] and targets float32 [tokens, D] of ``indices``."""
        pixel_values, grid = self.processor.preprocess_images([self.items[i][0] for i in indices])
        return pixel_values, grid, torch.cat([self.items[i][1] for i in indices])


def relative_error(features: torch.Tensor, targets: torch.Tensor) -> float:
    """sum ||f - t||² / sum ||t||² over tokens: 0 aligned, 1 as far as predicting zeros."""
    return float((features - targets).square().sum() / targets.square().sum())


def phrase_accuracy(features: torch.Tensor, targets: torch.Tensor, phrases: torch.Tensor) -> float:
    """Share of tokens whose nearest phrase embedding (of ``phrases`` [K, D]) is their own target's."""
    own = torch.cdist(targets, phrases).argmin(-1)
    return float((torch.cdist(features, phrases).argmin(-1) == own).float().mean())


def balanced_mean(errors: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Mean of ``errors`` [tokens] in which the object tokens (``background`` False) together weigh as much as the
    background ones: at the default framing nine tokens in ten are background, and by one token one vote a tower
    that says "background" everywhere is nearly optimal. With only one group present, its plain mean."""
    groups = [errors[background], errors[~background]]
    return torch.stack([g.mean() for g in groups if g.numel()]).mean()


def cell_accuracy(positions: torch.Tensor, grids: list[tuple[int, int]], weight: float) -> float:
    """Share of tokens whose nearest ``weight`` x :func:`position_code` of their image's grid is their own cell's;
    ``positions`` [tokens, D] are the features less the tokens' phrase embeddings, images in ``grids`` order."""
    hits, start = 0, 0
    for h, w in grids:
        codes = weight * position_code(h, w, positions.shape[1]).to(positions.device)
        nearest = torch.cdist(positions[start : start + h * w], codes).argmin(-1)
        hits += int((nearest == torch.arange(h * w, device=positions.device)).sum())
        start += h * w
    return hits / max(start, 1)


def align_vision_tower(
    model: VLModel,
    processor: Processor,
    records: list[Record],
    cfg: AlignConfig,
    held_out: Sequence[Record] = (),
    progress: bool = True,
) -> dict:
    """Train ``model.visual`` in place on ``records`` (see the module docstring); returns the loss curve and, with
    ``held_out``, the relative error and nearest-phrase accuracy of its tokens before and after (of every token,
    and of the tokens that show an object: nine in ten show none at the default framing). A non-finite loss
    stops it with FloatingPointError naming the step (the tower is then not worth saving)."""
    if not records:
        raise ValueError("vision alignment: no training records")
    device = next(model.visual.parameters()).device
    train = AlignmentTargets(records, model, processor, cfg.position_weight)
    held = AlignmentTargets(list(held_out), model, processor, cfg.position_weight) if held_out else None
    phrases = torch.stack(list({**train.phrases, **(held.phrases if held else {})}.values())).to(device)

    def score() -> dict:
        with torch.no_grad():
            everything = list(range(len(held.items)))
            pv, grid, t = held.batch(everything)
            f = model.visual(pv.to(device), grid.to(device)).float()
            t = t.to(device)
            objects = ~held.background(everything).to(device)
            codes = torch.cat([position_code(h, w, t.shape[1]) for h, w in held.grids]).to(device)
            placed = cfg.position_weight * codes  # 0 without the position code
            scores = {
                "relative_error": round(relative_error(f, t), 4),
                "accuracy": round(phrase_accuracy(f - placed, t - placed, phrases), 4),
                "object_accuracy": round(phrase_accuracy((f - placed)[objects], (t - placed)[objects], phrases), 4),
            }
            if cfg.position_weight:
                scores["cell_accuracy"] = round(cell_accuracy(f - (t - placed), held.grids, cfg.position_weight), 4)
            return scores

    report = {"held_out_before": score()} if held else {}
    params = [p for p in model.visual.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng, losses, t0 = random.Random(cfg.seed), [], time.perf_counter()
    steps = range(cfg.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="vision alignment", unit="step")
    for step in steps:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        indices = rng.sample(range(len(train.items)), min(cfg.batch_size, len(train.items)))
        pv, grid, targets = train.batch(indices)
        features = model.visual(pv.to(device), grid.to(device)).float()
        errors = F.mse_loss(features, targets.to(device), reduction="none").sum(-1)
        loss = balanced_mean(errors, train.background(indices).to(device)) if cfg.balanced else errors.mean()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"vision alignment: loss {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    report.update(losses=losses, seconds=round(time.perf_counter() - t0, 1))
    if held:
        report["held_out_after"] = score()
    return report


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a folder with records.jsonl of generated scenes")
    ap.add_argument("--model", required=True, help="the checkpoint whose vision tower to align")
    ap.add_argument("--out", required=True, help="where to write the aligned checkpoint")
    ap.add_argument("--held-out", type=int, default=64, help="the data's last N scenes, scored, not trained on")
    ap.add_argument("--device", default="cpu", help="where the tower trains (cpu, cuda)")
    for field, default in vars(AlignConfig()).items():
        if isinstance(default, bool):
            ap.add_argument(f"--{field.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=default)
        else:
            ap.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    args = ap.parse_args(argv)
    records, _ = load_records(Path(args.data) / "records.jsonl", check_files="none")
    scenes = list({r.image: r for r in records}.values())  # one record per image
    if len(scenes) <= args.held_out:
        raise SystemExit(f"{args.data}: {len(scenes)} scenes, need more than --held-out {args.held_out}")
    train, held = scenes[: -args.held_out or None], scenes[len(scenes) - args.held_out :]
    model, processor = from_pretrained(args.model).to(args.device), processor_from_pretrained(args.model)
    cfg = AlignConfig(**{f: getattr(args, f) for f in vars(AlignConfig())})
    report = align_vision_tower(model, processor, train, cfg, held)
    save_pretrained(model.cpu(), args.out)
    processor.save(args.out)
    k = max(1, len(report["losses"]) // 10)
    first, last = sum(report["losses"][:k]) / k, sum(report["losses"][-k:]) / k
    print(f"[align] {cfg.steps} steps on {len(train)} scenes, {report['seconds']} s: loss {first:.4f} -> {last:.4f}")
    if held:
        print(
            f"[align] held-out {len(held)} scenes: before {report['held_out_before']}, after {report['held_out_after']}"
        )
    print(f"[align] wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
