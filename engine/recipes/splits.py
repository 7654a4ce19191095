"""The records of the SIF jobs: a records file or folder, a bundled split, or a generated split."""

from __future__ import annotations

from pathlib import Path

from engine.config import ConfigError
from engine.data import bundled_dataset_dir
from engine.data.schema import RecordList, load_records
from engine.data.synth import SynthSplit, ensure_split
from engine.distributed import DistEnv


def generated_split(split: SynthSplit, output_dir: str, env: DistEnv) -> str:
    """The folder of a generated split under ``output_dir/data`` (rank 0 renders it once; the others wait)."""
    if env.is_main:
        ensure_split(Path(output_dir) / "data", split)
    env.barrier()
    return str(Path(output_dir) / "data" / split.folder_name())


def load_split(path: str, split: str, limit: int = 0, max_skip_share: float = 1.0) -> RecordList:
    """Records from ``path`` (a records.jsonl or a folder holding one), or the bundled ``split``, with the load's
    SkipReport (``.report``, which the datasets add decode-time skips to); raises if empty or if more than
    ``max_skip_share`` of the records were skipped (SkipLimitError, with the list)."""
    if path:
        file = Path(path) / "records.jsonl" if Path(path).is_dir() else Path(path)
        if not file.is_file():
            raise ConfigError(f"data path {path!r}: no such file ({file})")
    else:
        file = bundled_dataset_dir(split) / "records.jsonl"
    records, report = load_records(file)
    if not records:
        raise ValueError(f"{file}: no usable records ({report.summary()})")
    report.check_share(max_skip_share)
    return RecordList(records[:limit] if limit > 0 else records, report)
