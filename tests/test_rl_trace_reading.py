"""engine.rl.trace_reading and benchmarks/trace_reading.py: the parts of a reference trace, their tokens, the
teacher-forced scores, and the per-kind table."""

import math

import pytest
import torch

from benchmarks.trace_reading import main, swapped, table
from engine.data.schema import Record
from engine.models import from_pretrained, processor_from_pretrained
from engine.models.tiny import create_tiny_checkpoint
from engine.recipes.splits import load_split
from engine.rl import trace_reading
from engine.rl.evaluation import EvalConfig
from engine.rl.trace_reading import PARTS, part_spans, pooled_accuracy, score_reference, token_offsets
from engine.train.sft import sft_example

RESPONSE = (
    '<think><area>[{"bbox_2d":[0.0,0.0,1.0,1.0],"depth":0.354}]</area><text>Find the blue sphere and the red '
    'sphere.</text><area>[{"bbox_2d":[0.383,0.316,0.505,0.447],"depth":0.26}]</area><text>y 0.38 vs 0.28: '
    "below.</text></think><answer>below</answer>"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = create_tiny_checkpoint(tmp_path_factory.mktemp("tr") / "tiny", seed=0)
    return from_pretrained(path).eval(), processor_from_pretrained(path), path


def test_part_spans_pick_the_named_objects_the_numbers_the_opener_and_the_answer():
    spans = part_spans(RESPONSE)
    text = {part: [RESPONSE[a:b] for a, b in s] for part, s in spans.items()}
    assert text["names"] == ["blue sphere", "red sphere"]
    assert text["boxes"] == ["0.0", "0.0", "1.0", "1.0", "0.354", "0.383", "0.316", "0.505", "0.447", "0.26"]
    assert text["opener"] == ["y"]
    assert text["answer"] == ["below"]
    assert part_spans("<answer>A</answer>") == {"names": [], "seen": [], "boxes": [], "opener": [], "answer": [(8, 9)]}


def test_part_spans_split_the_objects_the_question_names_from_those_seen_in_the_image():
    response = "<think><area>[]</area><text>Find the cyan cube and the blue cube.</text></think><answer>cyan</answer>"
    spans = part_spans(response, "What color is the cube nearest to the blue cube?")
    text = {part: [response[a:b] for a, b in s] for part, s in spans.items()}
    assert text["names"] == ["blue cube"] and text["seen"] == ["cyan cube"]


def test_token_offsets_tile_the_decoded_string(tiny):
    _, processor, _ = tiny
    ids = processor.tokenizer.encode(RESPONSE)
    offsets = token_offsets(ids, processor)
    assert offsets[0][0] == 0 and offsets[-1][1] == len(RESPONSE)
    assert all(a[1] == b[0] for a, b in zip(offsets, offsets[1:]))
    assert "".join(RESPONSE[a:b] for a, b in offsets) == RESPONSE


def test_score_reference_scores_every_token_of_every_part(tiny):
    model, processor, _ = tiny
    record = next(r for r in load_split("", "heldout") if r.qtype == "above_below")
    with torch.no_grad():
        score = score_reference(model, processor, record, with_depth=False)
        blind = score_reference(model, processor, record, with_depth=False, parts=False)
    ids = processor.tokenizer.encode(record.response())
    offsets = token_offsets(ids, processor)
    for part, spans in part_spans(record.response(), record.question).items():
        expected = sum(1 for s, e in spans for a, b in offsets if a < e and b > s)
        hits, total = score.part_hits[part]
        assert total == expected and 0 <= hits <= total, part
        assert total > 0 or part == "seen", part  # an above/below question names both of its objects
    assert blind.cross_entropy == pytest.approx(score.cross_entropy) and blind.part_hits["answer"] == [0, 0]


def test_a_model_that_predicts_the_reference_scores_one(tiny, monkeypatch):
    """The greedy comparison can fail and succeed: logits that put all mass on the reference token score 1.0 on
    every part, and near-zero cross-entropy."""
    model, processor, _ = tiny
    record = next(r for r in load_split("", "heldout") if r.qtype == "left_right")
    example = sft_example(record, processor, with_depth=False, max_seq_len=1 << 30)
    targets = example.input_ids[example.assistant_mask]
    vocab = model.lm_head_weight.shape[0]

    def oracle_hidden(model, packed):  # one-hot rows through an identity head
        return torch.nn.functional.one_hot(targets, vocab).float() * 50.0

    monkeypatch.setattr("engine.rl.trace_reading.packed_hidden", oracle_hidden)
    monkeypatch.setattr(type(model), "lm_head_weight", property(lambda self: torch.eye(vocab)))
    with torch.no_grad():
        score = score_reference(model, processor, record, with_depth=False)
    assert all(h == t for h, t in score.part_hits.values())
    assert all(t > 0 for p, (_, t) in score.part_hits.items() if p != "seen")  # above/below names both objects
    assert score.cross_entropy < 1e-6
    assert pooled_accuracy([score.part_hits, None]) == {p: None if p == "seen" else 1.0 for p in PARTS}


def test_table_pools_tokens_per_kind_and_overall():
    records = [Record("a", "x.png", "q", "A", "choice", (), 8, 8, qtype="k1"),
               Record("b", "x.png", "q", "A", "choice", (), 8, 8, qtype="k2")]  # fmt: skip
    hits = [
        {"names": [1, 2], "seen": [1, 1], "boxes": [1, 1], "opener": [1, 1], "answer": [0, 0]},
        {"names": [2, 2], "seen": [0, 0], "boxes": [0, 3], "opener": [0, 1], "answer": [1, 1]},
    ]
    rows = table(records, hits)
    assert list(rows) == ["k1", "k2", "all"]
    assert rows["k1"]["names"] == 0.5 and math.isnan(rows["k1"]["answer"]) and math.isnan(rows["k2"]["seen"])
    assert rows["all"]["names"] == 0.75 and rows["all"]["boxes"] == 0.25 and rows["all"]["opener"] == 0.5
    assert rows["all"]["answer"] == 1.0


def test_cli_prints_both_tables(tiny, tmp_path, capsys):
    _, _, path = tiny
    out = main([str(path), "--limit", "3", "--swap", "--json", str(tmp_path / "t.json")])
    assert set(out) == {"own image", "another image"}
    for rows in out.values():
        assert all(0.0 <= rows["all"][p] <= 1.0 for p in PARTS)
    printed = capsys.readouterr().out
    assert "own image" in printed and "another image" in printed and "| all | 3 |" in printed
    assert (tmp_path / "t.json").is_file()


def test_swapped_pictures_come_from_another_scene():
    """Bundled records come two per scene: the swap skips a neighbour that shows the same picture."""
    records = load_split("", "heldout", 6)
    assert records[0].image == records[1].image  # two questions of one scene
    for before, after in zip(records, swapped(records)):
        assert after.image != before.image and after.question == before.question and after.trace == before.trace
    alone = records[:1]
    assert swapped(alone)[0].image == alone[0].image


def test_crop_mode_scores_the_trace_with_its_views_and_the_same_tokens(tiny, monkeypatch):
    model, processor, _ = tiny
    record = next(r for r in load_split("", "heldout") if r.qtype == "above_below")
    shown = []
    real = trace_reading.collate_sft
    monkeypatch.setattr(trace_reading, "collate_sft", lambda ex, *a, **k: shown.append(ex[0]) or real(ex, *a, **k))
    views = EvalConfig(focus_mode="crop").sft_views()
    with torch.no_grad():
        text = score_reference(model, processor, record, with_depth=True)
        crop = score_reference(model, processor, record, with_depth=True, views=views)
    image_tokens = [int((e.input_ids == processor.tokenizer.image_pad_id).sum()) for e in shown]
    assert image_tokens[1] > image_tokens[0]  # the crops of every area follow its </area>
    assert {p: t for p, (_, t) in crop.part_hits.items()} == {p: t for p, (_, t) in text.part_hits.items()}
    assert crop.cross_entropy != text.cross_entropy


def test_the_evaluation_scores_reference_traces_in_its_own_mode():
    assert EvalConfig(focus_mode="text").sft_views() is None
    views = EvalConfig(focus_mode="crop", max_views=2, crop_size=56, depth_views=False).sft_views()
    assert (views.focus_mode, views.max_views, views.crop_size, views.depth_views) == ("crop", 2, 56, False)
