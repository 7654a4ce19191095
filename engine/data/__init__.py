"""The SIF data path: record schema and loaders, SIF trace format, depth colour maps, image/depth I/O, DALI
decoding, the synthetic spatial-scene generator and the reverse-expansion trace builder.

Submodules are imported on use (``engine.data.schema``, ``engine.data.sif_format``, ...) so that importing the
package stays cheap; this module only locates the bundled dataset.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_SPLITS = ("train", "heldout")


def bundled_dataset_dir(split: str = "train") -> Path:
    """Folder of the small fixed synthetic set shipped with the package: ``records.jsonl`` + images/depth.

    ``train``: 200 records (100 scenes, seed 0); ``heldout``: 50 records (25 scenes, seed 1); 224 x 224, two
    questions per scene, traces included. Regenerate with ``python -m engine.data.synth --bundled``.
    """
    if split not in BUNDLED_SPLITS:
        raise ValueError(f"unknown bundled split {split!r}; expected one of {BUNDLED_SPLITS}")
    path = Path(__file__).resolve().parent / "bundled" / split
    if not (path / "records.jsonl").is_file():
        raise FileNotFoundError(f"bundled dataset missing: {path} (regenerate: python -m engine.data.synth --bundled)")
    return path
