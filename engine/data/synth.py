"""Synthetic spatial scenes with exact depth, spatial questions, ground-truth boxes and SIF traces.

``python -m engine.data.synth --out DIR --n N --seed S`` writes ``DIR/records.jsonl`` plus, per scene,
``images/<scene>.png`` (RGB), ``depth/<scene>.png`` (exact depth, 16-bit) and ``depth_color/<scene>.png``
(Spectral_r, made as the release makes it).

Scenes: 3–6 objects (sphere, cube with a yaw, upright cylinder; eight named colours; every colour+shape pair
unique in a scene) stand on a tiled floor under a sky, 3–11 m away, seen by a pinhole camera 2 m above the floor,
pitched down 24°, 60° field of view, rendered by engine.data.render (numpy ray casting, z-buffer, Lambert
shading, fog). Every object must be inside the frame and at least 35 % visible. The ``close`` framing
(``FRAMINGS``, ``--framing close``) shows 2–3 larger objects 3–6 m away under a 30° field of view; a mixture
(``--framing close+default``) takes the framings in turn, scene by scene.

Depth: view-space z of the first hit (sky: the far plane ``z_far``), min–max normalised over the image, so
0 = nearest pixel, 1 = far plane. The colour-mapped image is ``depth_to_spectral_r`` of that map.

Question kinds (``qtype``): ``left_right``, ``above_below`` (projected centres, image plane), ``nearer_farther``
(view depth of the centres; needs depth), ``counting`` (by shape or colour), ``size_compare`` (true volume,
whatever the apparent size), ``attribute`` (colour of the farthest object of a shape: small and distant, needs
zooming), ``grounding`` (which of several boxes holds an object) and ``locate`` (give the box). Each pair
comparison keeps a margin so that answers are unambiguous. The record's ``meta.scene`` holds the full scene
description (camera, objects' 3-D centres, sizes, yaw, 2-D boxes, visible-pixel depths) from which every answer
can be recomputed.

Determinism: scene ``i`` of seed ``s`` depends only on ``(s, i)`` (``numpy.random.default_rng([s, i])``), so any
prefix of a dataset is reproducible and workers can render scenes in any order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.data.boxes import Box, round_outward
from engine.data.depth_colormap import depth_to_spectral_r
from engine.data.images import save_depth, save_image
from engine.data.render import COLORS, SHAPES, Camera, Rendered, SceneObject, render
from engine.data.schema import trace_step_json
from engine.data.synth_questions import CURRICULUM_QTYPES, QTYPES, SceneTextWriter, make_question
from engine.data.traces import TraceConfig, build_trace


@dataclass(frozen=True)
class SynthConfig:
    """Generator settings; the defaults make 224 x 224 scenes for the tiny CPU model."""

    width: int = 224
    height: int = 224
    min_objects: int = 3
    max_objects: int = 6
    fov_deg: float = 60.0
    min_depth: float = 3.0  # objects' centres stand this far from the camera, in metres
    max_depth: float = 11.0
    min_size: float = 0.2  # objects' half-widths, in metres
    max_size: float = 0.6
    cam_height: float = 2.0
    pitch_deg: float = 24.0
    z_far: float = 16.0
    questions_per_scene: int = 1
    qtypes: tuple[str, ...] = QTYPES
    with_trace: bool = True
    distractor_prob: float = 0.5
    png_optimize: bool = False  # ~8 % smaller PNGs at ~10x the encode time (used for the bundled set)
    balanced: bool = True  # answers of two-way and counting questions drawn first (engine.data.synth_questions)


@dataclass
class Scene:
    scene_id: str
    camera: Camera
    light: tuple[float, float, float]
    objects: list[SceneObject]
    rendered: Rendered

    def description(self) -> dict[str, Any]:
        """JSON-ready scene description (camera + objects) stored in each record's ``meta.scene``."""
        return {
            "scene_id": self.scene_id,
            "camera": asdict(self.camera),
            "light": list(self.light),
            "objects": [
                {
                    "shape": ob.shape,
                    "color": ob.color,
                    "center": [round(v, 6) for v in ob.center],
                    "size": round(ob.size, 6),
                    "half_height": round(ob.half_height, 6),
                    "yaw": round(ob.yaw, 6),
                    "volume": round(ob.volume, 6),
                    "box": ob.box,
                    "visible_pixels": ob.visible_pixels,
                    "visible_depth": round(ob.visible_depth, 4),
                }
                for ob in self.objects
            ],
        }


def _sample_objects(rng: np.random.Generator, cfg: SynthConfig, cam: Camera) -> list[SceneObject]:
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    chosen = rng.choice(len(pairs), size=n, replace=False)
    half_fov = math.atan(cfg.width / 2 / cam.f)
    objects: list[SceneObject] = []
    for idx in chosen:
        color, shape = pairs[int(idx)]
        for _ in range(30):
            size = float(rng.uniform(cfg.min_size, cfg.max_size))
            half_height = size if shape != "cylinder" else float(rng.uniform(0.25, 0.8))
            zc = float(rng.uniform(cfg.min_depth, cfg.max_depth))
            xmax = max(zc * math.tan(half_fov) * 0.8 - size, 0.1)
            xc = float(rng.uniform(-xmax, xmax))
            yaw = float(rng.uniform(0, math.pi / 2)) if shape == "cube" else 0.0
            if all(math.hypot(xc - ob.center[0], zc - ob.center[2]) > 1.5 * (size + ob.size) + 0.2 for ob in objects):
                objects.append(SceneObject(shape, color, (xc, half_height, zc), size, half_height, yaw))
                break
    return objects


def make_scene(seed: int, index: int, cfg: SynthConfig = SynthConfig()) -> Scene:
    """Scene ``index`` of ``seed``: resampled until every object is in frame and ≥ 35 % (and 12 px) visible."""
    rng = np.random.default_rng([seed, index])
    cam = Camera.make(cfg.width, cfg.height, cfg.fov_deg, cfg.cam_height, cfg.pitch_deg)
    for _ in range(100):
        objects = _sample_objects(rng, cfg, cam)
        az, el = rng.uniform(-0.8, 0.8), rng.uniform(0.5, 1.1)
        light = np.array([math.sin(az) * math.cos(el), math.sin(el), -math.cos(az) * math.cos(el)])
        r = render(objects, cam, light, cfg.z_far)
        visible = np.array([(r.ids == k).sum() for k in range(len(objects))])
        if (
            len(objects) >= cfg.min_objects
            and not r.touches_border.any()
            and (visible >= np.maximum(12, 0.35 * r.unoccluded)).all()
        ):
            break
    else:
        raise RuntimeError(f"scene {seed}/{index}: no valid layout in 100 tries; relax SynthConfig")
    for k, ob in enumerate(objects):
        rows, cols = np.nonzero(r.ids == k)
        ob.box = list(
            round_outward(
                (
                    cols.min() / cfg.width,
                    rows.min() / cfg.height,
                    (cols.max() + 1) / cfg.width,
                    (rows.max() + 1) / cfg.height,
                )
            )
        )
        ob.visible_pixels = int(len(rows))
        ob.visible_depth = float(r.depth[rows, cols].mean())
    return Scene(f"s{seed}-{index:06d}", cam, tuple(float(v) for v in light), objects, r)


def scene_records(scene: Scene, cfg: SynthConfig, seed: int, index: int) -> list[dict[str, Any]]:
    """Question records (JSON dicts with paths relative to the dataset folder) for one scene."""
    rng = np.random.default_rng([seed, index, 1])
    records = []
    asked: set[str] = set()
    for qtype in [cfg.qtypes[k] for k in rng.permutation(len(cfg.qtypes))]:
        if len(records) == cfg.questions_per_scene:
            break
        if qtype in asked:  # a kind listed several times weighs the mix; a scene asks it once
            continue
        asked.add(qtype)
        q = make_question(qtype, scene, rng, cfg.balanced)
        if q is None:
            continue
        gt_boxes: list[Box] = [tuple(scene.objects[k].box) for k in q.targets]
        rec: dict[str, Any] = {
            "id": f"{scene.scene_id}-{q.qtype}",
            "image": f"images/{scene.scene_id}.png",
            "depth": f"depth/{scene.scene_id}.png",
            "depth_image": f"depth_color/{scene.scene_id}.png",
            "question": q.question,
            "answer": q.answer,
            "answer_type": q.answer_type,
            "options": q.options,
            "gt_boxes": [list(b) for b in gt_boxes],
            "width": cfg.width,
            "height": cfg.height,
            "qtype": q.qtype,
            "meta": {"scene": scene.description(), "targets": q.targets},
        }
        if cfg.with_trace:
            steps = build_trace(
                gt_boxes,
                scene.rendered.depth,
                q.question,
                q.answer,
                SceneTextWriter(scene, q),
                rng,
                TraceConfig(distractor_prob=cfg.distractor_prob),
            )
            rec["trace"] = [trace_step_json(s) for s in steps]
        records.append({k: v for k, v in rec.items() if v is not None})
    return records


def _render_and_write(args: tuple[int, int, SynthConfig, str]) -> list[dict[str, Any]]:
    seed, index, cfg, out = args
    scene = make_scene(seed, index, cfg)
    root = Path(out)
    opt = cfg.png_optimize
    save_image(root / "images" / f"{scene.scene_id}.png", scene.rendered.rgb, optimize=opt)
    save_depth(root / "depth" / f"{scene.scene_id}.png", scene.rendered.depth, optimize=opt)
    save_image(root / "depth_color" / f"{scene.scene_id}.png", depth_to_spectral_r(scene.rendered.depth), optimize=opt)
    return scene_records(scene, cfg, seed, index)


def generate_dataset(
    out: str | Path,
    n: int,
    seed: int,
    cfg: SynthConfig | tuple[SynthConfig, ...] = SynthConfig(),
    workers: int = 1,
) -> list[dict[str, Any]]:
    """Render scenes 0, 1, ... of ``seed`` until ``n`` records exist; write files and ``records.jsonl``.
    ``cfg`` may be a tuple of configs (``framed_mixture``): scene ``i`` is made with ``cfg[i % len(cfg)]``."""
    cycle = cfg if isinstance(cfg, tuple) else (cfg,)
    if not cycle or len({c.questions_per_scene for c in cycle}) != 1:
        raise ValueError("generate_dataset: give one config, or a non-empty tuple with one questions_per_scene")
    per_scene = cycle[0].questions_per_scene
    out = Path(out)
    for sub in ("images", "depth", "depth_color"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    per_batch = max(1, math.ceil(n / max(1, per_scene)))
    next_index = 0
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    try:
        while len(records) < n:
            jobs = [(seed, i, cycle[i % len(cycle)], str(out)) for i in range(next_index, next_index + per_batch)]
            next_index += per_batch
            results = pool.imap(_render_and_write, jobs, chunksize=4) if pool else map(_render_and_write, jobs)
            for recs in results:
                records.extend(recs)
            per_batch = max(1, math.ceil((n - len(records)) / max(1, per_scene)))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    records = records[:n]
    used = {Path(r["image"]).stem for r in records}
    for sub in ("images", "depth", "depth_color"):  # scenes rendered past the n-th record
        for f in (out / sub).glob("*.png"):
            if f.stem not in used:
                f.unlink()
    partial = out / "records.jsonl.tmp"
    with open(partial, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
    partial.replace(out / "records.jsonl")
    return records


FRAMINGS: dict[str, dict[str, float]] = {
    "default": {},
    # fewer, nearer, larger objects under a narrower field of view: each covers many of the tiny model's image tokens
    "close": {"fov_deg": 30.0, "min_objects": 2, "max_objects": 3, "max_depth": 6.0, "min_size": 0.3},
}


def framed(cfg: SynthConfig, framing: str) -> SynthConfig:
    """``cfg`` with the camera and object settings of the named framing (``FRAMINGS``)."""
    if framing not in FRAMINGS:
        raise ValueError(f"framing {framing!r}: unknown; use one of {sorted(FRAMINGS)}")
    return replace(cfg, **FRAMINGS[framing])


def framed_mixture(cfg: SynthConfig, framings: str) -> tuple[SynthConfig, ...]:
    """``cfg`` under each of the ``+``-joined framings (``"close+default"``), in that order: scene ``i`` of a
    dataset made from the tuple uses entry ``i % len``. Large objects beside small ones give a blind model's search
    its first gradient while the small ones train the same circuit."""
    names = framings.split("+")
    if not all(names):
        raise ValueError(f"framing {framings!r}: empty name; use names of {sorted(FRAMINGS)} joined by '+'")
    return tuple(framed(cfg, name) for name in names)


@dataclass
class SynthSplit:
    """A generated split for a recipe: ``records`` questions (``per_scene`` per scene) of scenes ``0, 1, ...`` of
    ``seed``, of the kinds in ``qtypes`` (comma-separated; a kind named k times is tried k times as often),
    rendered by ``workers`` processes, seen with the camera and objects of ``framing`` (``FRAMINGS``; several
    joined by ``+`` take turns scene by scene, ``framed_mixture``).
    ``records = 0``: none (the recipe uses its ``data.path`` or the bundled set).
    """

    records: int = 0
    seed: int = 100
    per_scene: int = 2
    qtypes: str = ",".join(QTYPES)
    workers: int = 2
    framing: str = "default"

    def config(self) -> tuple[SynthConfig, ...]:
        kinds = tuple(q for q in self.qtypes.split(",") if q)
        unknown = sorted(set(kinds) - set(QTYPES + CURRICULUM_QTYPES))
        if unknown or not kinds:
            raise ValueError(f"synth.qtypes {self.qtypes!r}: unknown kinds {unknown}; use {QTYPES + CURRICULUM_QTYPES}")
        return framed_mixture(SynthConfig(questions_per_scene=self.per_scene, qtypes=kinds), self.framing)

    def folder_name(self) -> str:
        mix = hashlib.sha1(self.qtypes.encode()).hexdigest()[:8]
        framing = "" if self.framing == "default" else f"-{self.framing}"
        return f"synth-seed{self.seed}-n{self.records}-q{self.per_scene}-{mix}{framing}"


def ensure_split(root: str | Path, split: SynthSplit) -> Path:
    """The folder of ``split`` under ``root``, generated unless a complete one is there (``records.jsonl`` is
    written last, through a temporary name, so a killed generation is redone, never half-used)."""
    out = Path(root) / split.folder_name()
    if not (out / "records.jsonl").is_file():
        generate_dataset(out, split.records, split.seed, split.config(), workers=split.workers)
    return out


# The bundled splits keep the unbalanced makers they were made with: their prompts and traces are the corpus of the
# tiny model's BPE vocabulary, and the generated splits (SynthSplit) are the balanced ones.
BUNDLED_CONFIG = SynthConfig(questions_per_scene=2, png_optimize=True, balanced=False)
BUNDLED_SPECS = {"train": {"seed": 0, "n": 200}, "heldout": {"seed": 1, "n": 50}}


def generate_bundled(root: str | Path, workers: int = 1) -> None:
    """(Re)generate the bundled splits under ``root`` (the package's ``engine/data/bundled``)."""
    for split, spec in BUNDLED_SPECS.items():
        generate_dataset(Path(root) / split, spec["n"], spec["seed"], BUNDLED_CONFIG, workers=workers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.data.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="output folder (records.jsonl, images/, depth/, depth_color/)")
    p.add_argument("--n", type=int, help="number of records")
    p.add_argument("--bundled", action="store_true", help="regenerate the package's bundled set and exit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("W", "H"))
    p.add_argument("--per-scene", type=int, default=1, help="questions per scene")
    p.add_argument(
        "--qtypes",
        default=",".join(QTYPES),
        help="comma-separated question kinds; a kind named k times is tried k times as often (a training mix)",
    )
    p.add_argument("--distractor-prob", type=float, default=0.5)
    p.add_argument("--no-trace", action="store_true")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--framing",
        default="default",
        help=f"camera and object settings, one of {sorted(FRAMINGS)} or several joined by '+' (scene by scene)",
    )
    a = p.parse_args(argv)
    if a.bundled:
        generate_bundled(Path(__file__).resolve().parent / "bundled", workers=a.workers)
        return 0
    if a.out is None or a.n is None:
        p.error("--out and --n are required (or --bundled)")
    qtypes = tuple(q for q in a.qtypes.split(",") if q)
    unknown = [q for q in qtypes if q not in QTYPES + CURRICULUM_QTYPES]
    if unknown:
        p.error(f"unknown question kind(s) {unknown}; choose from {list(QTYPES + CURRICULUM_QTYPES)}")
    cfg = SynthConfig(
        width=a.size[0],
        height=a.size[1],
        questions_per_scene=a.per_scene,
        qtypes=qtypes,
        with_trace=not a.no_trace,
        distractor_prob=a.distractor_prob,
    )
    try:
        cfgs = framed_mixture(cfg, a.framing)
    except ValueError as e:
        p.error(str(e))
    records = generate_dataset(a.out, a.n, a.seed, cfgs, workers=a.workers)
    print(f"wrote {len(records)} records to {Path(a.out) / 'records.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
