"""engine/train/vision_align.py: each image token's target names what its patch shows, and training reaches it."""

import dataclasses

import pytest
import torch

from engine.data.schema import Record, load_records
from engine.data.synth import SynthConfig, framed, generate_dataset
from engine.models import from_pretrained, processor_from_pretrained
from engine.models.tiny import create_tiny_checkpoint
from engine.train.vision_align import (
    BACKGROUND,
    AlignConfig,
    AlignmentTargets,
    PhraseTargets,
    align_vision_tower,
    balanced_mean,
    cell_accuracy,
    main,
    phrase_embedding,
    position_code,
    scene_objects,
    token_words,
)


def obj(colour, shape, box, z):
    return {"color": colour, "shape": shape, "box": box, "center": [0.0, 0.0, z]}


def test_token_words_name_the_nearest_object_at_each_token_centre():
    """A 2 x 4 grid: token centres at x = 1/8, 3/8, 5/8, 7/8 and y = 1/4, 3/4. The far red cube spans the left
    half, the near blue sphere the middle two columns of the top row: where they overlap, the sphere wins."""
    objects = [obj("red", "cube", [0.0, 0.0, 0.5, 1.0], 9.0), obj("blue", "sphere", [0.3, 0.0, 0.7, 0.5], 4.0)]
    assert token_words(objects, 2, 4) == [
        "red cube", "blue sphere", "blue sphere", BACKGROUND,
        "red cube", "red cube", BACKGROUND, BACKGROUND,
    ]  # fmt: skip
    assert token_words([], 1, 2) == [BACKGROUND, BACKGROUND]


def test_an_object_between_token_centres_gets_the_cell_its_centre_is_in():
    """A 4 x 4 grid (centres at 1/8, 3/8, ...): a green cone of box [0.26, 0.52, 0.36, 0.62] holds no token centre;
    its centre (0.31, 0.57) lies in cell (row 2, column 1). A nearer object over that cell keeps it."""
    cone = obj("green", "cone", [0.26, 0.52, 0.36, 0.62], 9.0)
    words = token_words([cone], 4, 4)
    assert words[2 * 4 + 1] == "green cone" and words.count("green cone") == 1
    wall = obj("gray", "cube", [0.25, 0.5, 0.5, 0.75], 3.0)
    assert "green cone" not in token_words([cone, wall], 4, 4)
    edge = obj("red", "sphere", [0.97, 0.97, 1.0, 1.0], 5.0)  # centre on the last cell, not past it
    assert token_words([edge], 4, 4)[-1] == "red sphere"


def test_records_without_a_scene_are_refused_by_id():
    bare = Record(
        id="rec-7", image="x.png", question="q", answer="a", answer_type="text", gt_boxes=[], width=8, height=8
    )
    with pytest.raises(ValueError, match="rec-7.*meta.scene.objects"):
        scene_objects(bare)
    partial = dataclasses.replace(bare, meta={"scene": {"objects": [{"box": [0, 0, 1, 1], "color": "red"}]}})
    with pytest.raises(ValueError, match=r"rec-7: meta.scene.objects\[0\] lacks \['center', 'shape'\]"):
        scene_objects(partial)


def test_position_code_tells_every_cell_apart_at_unit_norm():
    code = position_code(8, 8, 192)
    assert code.shape == (64, 192)
    torch.testing.assert_close(code.norm(dim=1), torch.ones(64))
    distances = torch.cdist(code, code) + torch.eye(64) * 10
    assert distances.min() > 0.2  # neighbours differ; no two cells share a code
    grid = code.view(8, 8, 192)  # a column part plus a row part: moving right changes it alike in every row
    step_right = grid[:, 5] - grid[:, 2]
    torch.testing.assert_close(step_right, step_right[:1].expand(8, -1))
    assert step_right[0].norm() > 0.5
    with pytest.raises(ValueError, match="16 features do not fit 8 dimensions"):
        position_code(2, 2, 8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    ckpt = create_tiny_checkpoint(root / "tiny", seed=0)
    cfg = dataclasses.replace(framed(SynthConfig(), "close"), qtypes=("locate",), with_trace=False)
    generate_dataset(root / "scenes", 40, 3, cfg)
    records, _ = load_records(root / "scenes" / "records.jsonl", check_files="none")
    return root, ckpt, records


def test_phrase_targets_are_the_decoders_word_embeddings(tiny):
    _, ckpt, records = tiny
    model, processor = from_pretrained(ckpt), processor_from_pretrained(ckpt)
    emb = model.model.embed_tokens.weight.detach()
    red, cube = (emb[processor.tokenizer.encode(" " + w)].mean(0) for w in ("red", "cube"))
    torch.testing.assert_close(phrase_embedding("red cube", emb, processor), red + cube)
    targets = AlignmentTargets(records[:2], model, processor)
    rgb, per_token = targets.items[0]
    assert per_token.shape == (64, model.config.text.hidden_size)  # 224 x 224 -> 8 x 8 merged tokens
    words = token_words(scene_objects(records[0]), 8, 8)
    for k in (0, 27, 63):
        torch.testing.assert_close(per_token[k], targets.phrases[words[k]])
    assert any(w != BACKGROUND for w in words)
    placed = PhraseTargets(emb, processor, position_weight=0.5)(records[0], 8, 8)
    torch.testing.assert_close(placed - per_token, 0.5 * position_code(8, 8, per_token.shape[1]))


def test_alignment_trains_the_tower_alone_and_reaches_held_out_targets(tiny):
    _, ckpt, records = tiny
    model, processor = from_pretrained(ckpt), processor_from_pretrained(ckpt)
    decoder_before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("visual.")}
    tower_before = model.visual.merger.mlp[2].weight.detach().clone()
    report = align_vision_tower(
        model, processor, records[:32], AlignConfig(steps=40, batch_size=8), records[32:], progress=False
    )
    for n, p in model.named_parameters():
        if n in decoder_before:
            assert torch.equal(p, decoder_before[n]), n
    assert not torch.equal(model.visual.merger.mlp[2].weight, tower_before)
    before, after = report["held_out_before"], report["held_out_after"]
    # the untrained tower's tokens are ~9x too long
    assert after["relative_error"] < before["relative_error"] / 50, report
    assert after["accuracy"] > before["accuracy"] + 0.3, report
    assert len(report["losses"]) == 40 and report["losses"][-1] < report["losses"][0] / 10


def test_cell_accuracy_finds_each_tokens_cell_from_its_position_part():
    codes = torch.cat([position_code(2, 3, 64), position_code(4, 4, 64)])
    assert cell_accuracy(0.7 * codes, [(2, 3), (4, 4)], 0.7) == 1.0
    swapped = torch.cat([codes[:6].flip(0), codes[6:]])  # the first image's six tokens all in the wrong cell
    assert cell_accuracy(0.7 * swapped, [(2, 3), (4, 4)], 0.7) == pytest.approx(16 / 22)


def test_balanced_mean_weighs_the_object_tokens_as_much_as_the_background():
    errors = torch.tensor([1.0, 1.0, 1.0, 5.0])
    background = torch.tensor([True, True, True, False])
    assert float(balanced_mean(errors, background)) == pytest.approx(3.0)  # plain mean: 2.0
    assert float(balanced_mean(errors, torch.ones(4, dtype=torch.bool))) == pytest.approx(2.0)
    assert float(balanced_mean(errors, torch.zeros(4, dtype=torch.bool))) == pytest.approx(2.0)


def test_balanced_alignment_scores_the_object_tokens_apart(tiny):
    _, ckpt, records = tiny
    model, processor = from_pretrained(ckpt), processor_from_pretrained(ckpt)
    cfg = AlignConfig(steps=2, batch_size=4, balanced=True)
    report = align_vision_tower(model, processor, records[:8], cfg, records[32:], progress=False)
    held = AlignmentTargets(records[32:], model, processor)
    assert 0 < int((~held.background(list(range(len(held.items))))).sum()) < 64 * len(held.items)
    assert set(report["held_out_after"]) == {"relative_error", "accuracy", "object_accuracy"}


def test_alignment_with_a_position_code_reports_where_the_tokens_are(tiny):
    _, ckpt, records = tiny
    model, processor = from_pretrained(ckpt), processor_from_pretrained(ckpt)
    cfg = AlignConfig(steps=30, batch_size=8, position_weight=1.0)
    report = align_vision_tower(model, processor, records[:32], cfg, records[32:], progress=False)
    before, after = report["held_out_before"], report["held_out_after"]
    assert set(after) == {"relative_error", "accuracy", "object_accuracy", "cell_accuracy"}
    # the phrase part is scored with the code taken off; learning the cells takes hundreds of steps (measured in
    # benchmarks/results/2026-12-07-cpu-finding-objects), more than this test runs
    assert after["accuracy"] > before["accuracy"] + 0.3, report
    assert after["relative_error"] < before["relative_error"] / 20, report
    assert 0.0 <= after["cell_accuracy"] <= 1.0


def test_a_non_finite_loss_stops_the_alignment_at_its_step(tiny):
    _, ckpt, records = tiny
    model, processor = from_pretrained(ckpt), processor_from_pretrained(ckpt)
    with torch.no_grad():
        model.visual.merger.mlp[2].bias[0] = float("nan")
    with pytest.raises(FloatingPointError, match="vision alignment: loss nan at step 0"):
        align_vision_tower(model, processor, records[:4], AlignConfig(steps=3, batch_size=2), progress=False)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_cli_writes_a_loadable_aligned_checkpoint(tiny, capsys, device):
    root, ckpt, _ = tiny
    main(["--data", str(root / "scenes"), "--model", str(ckpt), "--out", str(root / "aligned"), "--steps", "2",
          "--batch-size", "2", "--held-out", "4", "--device", device])  # fmt: skip
    printed = capsys.readouterr().out
    assert "[align] 2 steps on 36 scenes" in printed and "held-out 4 scenes" in printed
    aligned = from_pretrained(root / "aligned")
    original = from_pretrained(ckpt)
    assert not torch.equal(aligned.visual.merger.mlp[2].weight, original.visual.merger.mlp[2].weight)
    assert torch.equal(aligned.model.embed_tokens.weight, original.model.embed_tokens.weight)
    with pytest.raises(SystemExit, match="need more than --held-out 40"):
        main(["--data", str(root / "scenes"), "--model", str(ckpt), "--out", str(root / "x"), "--held-out", "40"])


class MainRank:
    is_main = True
    device = torch.device("cpu")

    def barrier(self) -> None:
        pass


def test_the_jobs_default_is_built_aligned_and_whole(tmp_path):
    """resolve_checkpoint with an empty path: the tiny default with its tower aligned, in a folder named by the
    alignment settings; a half-built folder left by a killed build is rebuilt, never used."""
    from engine.config import ModelSection
    from engine.recipes.policy import resolve_checkpoint, tiny_dirname

    section = ModelSection(align_steps=2, align_scenes=4)
    (tmp_path / "tiny-model-aligned2x4.partial").mkdir()  # a killed build's leftovers
    (tmp_path / "tiny-model-aligned2x4.partial" / "config.json").write_text("{")
    threads = torch.get_num_threads()
    path = resolve_checkpoint(section, str(tmp_path), MainRank())
    assert torch.get_num_threads() == threads  # the build uses every core, then gives the rank its threads back
    assert path == tmp_path / "tiny-model-aligned2x4" and not (tmp_path / "tiny-model-aligned2x4.partial").exists()
    assert len((tmp_path / "data").iterdir().__next__().joinpath("records.jsonl").read_text().splitlines()) == 4
    random_tower = resolve_checkpoint(ModelSection(align_steps=0), str(tmp_path), MainRank())
    assert random_tower == tmp_path / "tiny-model"
    aligned, unaligned = from_pretrained(path), from_pretrained(random_tower)
    assert not torch.equal(aligned.visual.merger.mlp[2].weight, unaligned.visual.merger.mlp[2].weight)
    assert torch.equal(aligned.model.embed_tokens.weight, unaligned.model.embed_tokens.weight)
    assert resolve_checkpoint(section, str(tmp_path), MainRank()) == path  # built once
    placed = resolve_checkpoint(
        ModelSection(align_steps=2, align_scenes=4, align_position_weight=1.0), str(tmp_path), MainRank()
    )
    assert placed == tmp_path / "tiny-model-aligned2x4-position1"  # its own folder: taught where tokens are as well
    tuned = ModelSection(align_steps=2, align_scenes=4, align_lr=3e-3, align_balanced=True)
    assert tiny_dirname(tuned) == "tiny-model-aligned2x4-lr0.003-balanced"
    assert not torch.equal(from_pretrained(placed).visual.merger.mlp[2].weight, aligned.visual.merger.mlp[2].weight)


def test_a_default_built_with_another_config_is_built_again(tmp_path, capsys):
    """A runs/ folder kept from an older version (here: the decoder's earlier rotary base) is not trained on."""
    import json

    from engine.config import ModelSection
    from engine.recipes.policy import resolve_checkpoint

    section = ModelSection(align_steps=0)
    path = resolve_checkpoint(section, str(tmp_path), MainRank())
    raw = json.loads((path / "config.json").read_text())
    current = raw["rope_theta"]
    raw["rope_theta"] = 10000.0
    (path / "config.json").write_text(json.dumps(raw))
    assert resolve_checkpoint(section, str(tmp_path), MainRank()) == path
    assert "another configuration" in capsys.readouterr().out
    assert from_pretrained(path).config.text.rope_theta == current
