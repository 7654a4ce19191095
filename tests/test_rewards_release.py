"""The two reward profiles, ``release`` and ``strict`` (docs/rewards.md), on hand-computed cases.

Every rule of the release profile has a case here, with its expected number worked out in the comment; where the
strict profile scores the same text differently, the case checks both numbers side by side. Texts are written
out raw (not with the SIF writer) so that malformed ones can be tested.
"""

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from engine.config import apply_mapping, read_config_file
from engine.rl.grpo import RLConfig
from engine.rl.iou import release_box_set_iou
from engine.rl.rewards import (
    AnswerProgress,
    RewardTarget,
    RewardWeights,
    release_answer,
    release_areas,
    release_format_reward,
    release_grounding_reward,
    release_progress_reward,
    score_completions,
)

ROOT = Path(__file__).resolve().parents[1]
GT = [[0.5, 0.5, 1.0, 1.0]]  # the bottom-right quarter


def _box(x1, y1, x2, y2, d=0.5) -> str:
    return f'{{"bbox_2d":[{x1},{y1},{x2},{y2}],"depth":{d}}}'


def _area(*boxes: str) -> str:
    return "<area>[" + ",".join(boxes) + "]</area>"


def _think(*areas: str, answer: str = "B") -> str:
    body = "".join(f"{a}<text>step {i}</text>" for i, a in enumerate(areas))
    return f"<think>{body}</think><answer>{answer}</answer>"


def _target(**kw) -> RewardTarget:
    base = dict(record_id="r0", question="q?", answer="B", answer_type="choice", gt_boxes=GT)
    base.update(kw)
    return RewardTarget(**base)


def _terms(text: str, target: RewardTarget | None = None) -> dict[str, dict[str, float]]:
    """{profile: {term: value}} for one completion."""
    out = {}
    for profile in ("release", "strict"):
        batch = score_completions([text], [0], [target or _target()], weights=RewardWeights(profile=profile))
        out[profile] = {k: float(v[0]) for k, v in batch.terms.items()}
    return out


def _both(term: str, text: str, target: RewardTarget | None = None) -> tuple[float, float]:
    """(release, strict) value of ``term``."""
    t = _terms(text, target)
    return t["release"][term], t["strict"][term]


# ------------------------------------------------------------------------------------------------ config


def test_profile_is_a_config_field_checked_by_name() -> None:
    assert RewardWeights().profile == "strict"  # the engine default (the tiny recipe keeps it)
    assert RLConfig().rewards.profile == "strict"
    with pytest.raises(ValueError, match="profile"):
        RewardWeights(profile="loose")
    assert RewardWeights(profile="release").as_dict() == {"format": 1.0, "answer": 1.0, "grounding": 1.0, "depth": 1.0}


def test_the_7b_config_uses_the_release_profile() -> None:
    @dataclass
    class Sections:
        rl: RLConfig = field(default_factory=RLConfig)

    path = ROOT / "recipes" / "configs" / "grpo_qwen2_5_vl_7b.toml"
    cfg = Sections()
    apply_mapping(cfg, {"rl": read_config_file(path)["rl"]}, source=str(path))
    assert cfg.rl.rewards.profile == "release"
    assert cfg.rl.rewards.as_dict() == {"format": 1.0, "answer": 1.0, "grounding": 1.0, "depth": 1.0}


# ------------------------------------------------------------------------------------------------ format

GOOD = _think(_area(_box(0.1, 0.2, 0.5, 0.6, 0.3)))


@pytest.mark.parametrize(
    ("text", "release", "strict"),
    [
        (GOOD, 1.0, 1.0),
        # unanchored: text before <think> and after </answer> is ignored by the release
        ("Sure. " + GOOD + " Done.", 1.0, 0.0),
        # the answer may even come first
        ("<answer>B</answer>" + GOOD.split("<answer>")[0], 1.0, 0.0),
        # only the first think block is checked
        (GOOD + "<think>garbage</think>", 1.0, 0.0),
        # an empty list of boxes passes the release
        (_think("<area>[]</area>"), 1.0, 0.0),
        # booleans are numbers to the release (Python's isinstance(True, int)); the SIF parser rejects them
        (_think(_area('{"bbox_2d":[0,0,true,true],"depth":0}')), 1.0, 0.0),
        # junk between a </text> and the next <area> is not a tag: the release passes it
        (
            _think(_area(_box(0.1, 0.2, 0.5, 0.6)), _area(_box(0.2, 0.2, 0.4, 0.4))).replace(
                "</text><area>", "</text>so<area>"
            ),
            1.0,
            0.0,
        ),
        # junk between </area> and <text> breaks the release's area/text pairing
        (GOOD.replace("</area><text>", "</area>so<text>"), 0.0, 0.0),
        # any other tag inside think breaks the groups of four (strict reserves only the SIF tags)
        (GOOD.replace("step 0", "a <b>red</b> cube"), 0.0, 1.0),
        # think must end with </text>
        ("<think>" + _area(_box(0.1, 0.2, 0.5, 0.6)) + "</think><answer>B</answer>", 0.0, 0.0),
        # no answer, blank answer, blank text
        (GOOD.split("<answer>")[0], 0.0, 0.0),
        (GOOD.replace("<answer>B", "<answer> "), 0.0, 0.0),
        (GOOD.replace("step 0", " "), 0.0, 0.0),
        # a box without depth; x2 <= x1; a coordinate outside [0, 1]; depth outside [0, 1]
        (_think(_area('{"bbox_2d":[0.1,0.2,0.5,0.6]}')), 0.0, 0.0),
        (_think(_area(_box(0.5, 0.2, 0.5, 0.6))), 0.0, 0.0),
        (_think(_area(_box(0.1, 0.2, 1.2, 0.6))), 0.0, 0.0),
        (_think(_area(_box(0.1, 0.2, 0.5, 0.6, 1.5))), 0.0, 0.0),
        # decimals by str(): 0.1230 is read as 0.123 (3 digits) and passes; 0.1234 and 1e-05 ('1e-05') fail
        (_think(_area(_box("0.1230", 0.2, 0.5, 0.6))), 1.0, 1.0),
        (_think(_area(_box(0.1234, 0.2, 0.5, 0.6))), 0.0, 0.0),
        (_think(_area(_box(0.1, 0.2, 0.5, 0.6, "1e-05"))), 0.0, 0.0),
        # a lone object instead of a list, a number item, unreadable JSON: 0 (the release raises on the last two)
        (_think("<area>" + _box(0.1, 0.2, 0.5, 0.6) + "</area>"), 0.0, 0.0),
        (_think("<area>[5]</area>"), 0.0, 0.0),
        (_think("<area>[{oops</area>"), 0.0, 0.0),
    ],
)
def test_format(text: str, release: float, strict: float) -> None:
    assert release_format_reward(text) == release
    assert _both("format", text) == (release, strict)


# ------------------------------------------------------------------------------------------------ answer


def test_release_answer_is_the_first_answer_block_anywhere() -> None:
    assert release_answer("x <answer>\n B \n</answer> y <answer>C</answer>") == "B"
    assert release_answer("<answer>A<answer>B</answer>") == "A<answer>B"  # strict's parser reads "B" here
    assert release_answer("<answer>B") is None
    # scored by the rule on that text: the answer before <think> counts in both profiles' answer term
    assert _both("answer", "<answer>B</answer>") == (1.0, 1.0)


# ---------------------------------------------------------------------------------------------------- areas


def test_release_areas_read_every_area_with_raw_values() -> None:
    text = (
        '<think><area>[{"bbox_2d":[0.5,0.5,1.2,1.0]}, {"depth":0.3}]</area><text>t</text></think>'
        "<answer>B</answer><area>oops</area>"
        '<area>[{"bbox_2d":[0,0,1,1],"depth":0.5}, 7, {"bbox_2d":[0,0,0.5,0.5]}]</area>'
    )
    areas = release_areas(text)
    # area 0: the box without depth and with x2 = 1.2 is kept as written; the depth-only item has no box
    assert areas[0].boxes == [[0.5, 0.5, 1.2, 1.0]] and areas[0].depths == [0.3]
    # area 1 (outside think): unreadable -> one empty entry in each list
    assert areas[1].boxes == [[]] and areas[1].depths == [[]]
    # area 2: reading stops at the number item (the release's `in` fails on it), which leaves an empty entry
    assert areas[2].boxes == [[0, 0, 1, 1], []] and areas[2].depths == [0.5, []]


# ------------------------------------------------------------------------------------------------ grounding


def test_release_box_set_iou() -> None:
    # P = two quarters, G = one of them. union: ∪P (0.5) ⊇ G (0.25) -> 0.5; matched: 1 / min(2, 1) = 1 -> 0.75
    assert release_box_set_iou([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], GT) == pytest.approx(0.75)
    # an inverted box leaves the union region and matches nothing: union 1, matched 1 / min(2, 1) -> 1
    assert release_box_set_iou([[0.5, 0.5, 1, 1], [0.9, 0.9, 0.6, 0.6]], GT) == pytest.approx(1.0)
    # only a flat box against no ground truth: union of two empty regions 1, matched 0 (one set empty) -> 0.5
    assert release_box_set_iou([[0.5, 0.5, 0.5, 1]], []) == pytest.approx(0.5)
    assert release_box_set_iou([], []) == 1.0


def test_grounding_progress_from_the_first_area_not_exactly_the_full_image() -> None:
    start = _area(_box(0.25, 0.25, 1, 1))  # IoU 0.25 / 0.5625 = 4/9 in both terms
    end = _area(_box(0.5, 0.5, 1, 1))  # 1
    full = _area(_box(0, 0, 1, 1))
    # 1 + (1 − 4/9) = 14/9 in both profiles
    assert _both("grounding", _think(full, start, end)) == (pytest.approx(14 / 9), pytest.approx(14 / 9))
    # getting worse: 4/9 + 0
    assert _both("grounding", _think(full, end, start)) == (pytest.approx(4 / 9), pytest.approx(4 / 9))
    # a nearly full first area: strict skips it (within 0.02 of the full image), the release does not.
    # release: start IoU = 0.25 / 0.99 = 25/99 -> 1 + 74/99; strict: start = end -> 1
    near = _area(_box(0.01, 0, 1, 1))
    assert _both("grounding", _think(near, end)) == (pytest.approx(1 + 74 / 99), pytest.approx(1.0))
    # only full-image areas: start = end -> IoU([0,1]², G) = 0.25 in both
    assert _both("grounding", _think(full)) == (pytest.approx(0.25), pytest.approx(0.25))


def test_grounding_uses_raw_boxes_and_min_division() -> None:
    # the end box has no depth and x2 = 1.2: the release still scores it. |P| = 0.7·0.5 = 0.35 ⊇ G (0.25):
    # union 0.25 / 0.35 = 5/7, matched 5/7 -> 5/7. Strict drops the invalid box -> no box -> 0.
    raw = _think('<area>[{"bbox_2d":[0.5,0.5,1.2,1.0]}]</area>')
    assert _both("grounding", raw) == (pytest.approx(5 / 7), 0.0)
    # two boxes, one on G: release (0.5 + 1/min(2,1)) / 2 = 0.75; strict (0.5 + 1/max(2,1)) / 2 = 0.5
    two = _think(_area(_box(0, 0, 0.5, 0.5), _box(0.5, 0.5, 1, 1)))
    assert _both("grounding", two) == (pytest.approx(0.75), pytest.approx(0.5))


def test_grounding_unscorable_and_empty_areas() -> None:
    end = _area(_box(0.5, 0.5, 1, 1))
    # an empty first area is the start (IoU 0): 1 + (1 − 0) = 2 in both
    assert _both("grounding", _think("<area>[]</area>", end)) == (2.0, 2.0)
    # an unreadable first area cannot be scored: the release keeps the end alone (1); strict reads it as an
    # empty start (IoU 0): 2
    assert _both("grounding", _think("<area>oops</area>", end)) == (1.0, 2.0)
    # an unreadable, empty or missing end: 0
    assert _both("grounding", _think(end, "<area>oops</area>")) == (0.0, 0.0)
    assert _both("grounding", _think(end, "<area>[]</area>")) == (0.0, 0.0)
    assert _both("grounding", "<think>no boxes</think><answer>B</answer>") == (0.0, 0.0)
    # a box of 3 numbers or a string coordinate makes its area unscorable
    assert release_grounding_reward([[[0.5, 0.5, 1.0]]], GT) == 0.0
    assert release_grounding_reward([[["0.5", 0.5, 1.0, 1.0]]], GT) == 0.0


# ---------------------------------------------------------------------------------------------------- depth


def _halves() -> torch.Tensor:
    depth = torch.full((4, 4), 0.2)
    depth[:, 2:] = 0.8  # columns 0-1: 0.2, columns 2-3: 0.8
    return depth


def test_depth_relative_tolerance_over_all_depth_entries() -> None:
    # m = 0.2, 0.8, 0.5. |.2−.21|/.2 = .05 ✓, |.8−.75|/.8 = .0625 ✓, |.5−.56|/.5 = .12 ✗ -> 2/3 (both)
    text = _think(
        _area(_box(0, 0, 0.5, 1, 0.21), _box(0.5, 0, 1, 1, 0.75)),
        _area(_box(0, 0, 1, 1, 0.56)),
    )
    got = _both("depth", text, _target(depth=_halves()))
    assert got == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    # no depth map: 0
    assert _both("depth", text) == (0.0, 0.0)


def test_depth_zero_mean_is_a_miss_in_the_release() -> None:
    # m = 0, stated 0.0: the release divides by m (a miss); strict's absolute floor 5e-4 makes it a hit
    text = _think(_area(_box(0, 0, 0.5, 1, 0.0)))
    assert _both("depth", text, _target(depth=torch.zeros(4, 4))) == (0.0, 1.0)


def test_depth_pairs_the_kth_box_with_the_kth_depth_entry() -> None:
    # boxes [left half, right half], depths [0.2] (the first item has none): the release pairs the left half
    # (m = 0.2) with 0.2 -> a hit, over 1 depth entry -> 1. Strict: the left box is invalid (a miss), the right one
    # (m = 0.8) states 0.2 (a miss) -> 0 / 2.
    text = _think('<area>[{"bbox_2d":[0,0,0.5,1]}, {"bbox_2d":[0.5,0,1,1],"depth":0.2}]</area>')
    assert _both("depth", text, _target(depth=_halves())) == (1.0, 0.0)
    # stated 0.8 instead: release m(left) 0.2 vs 0.8 -> a miss: 0; strict: right box hit, 1 of 2 boxes: 0.5
    text = text.replace('"depth":0.2', '"depth":0.8')
    assert _both("depth", text, _target(depth=_halves())) == (0.0, 0.5)


def test_depth_measures_raw_boxes_clamped() -> None:
    target = _target(depth=_halves())
    # x2 = 1.2 clamps to column 3: m = 0.8, stated 0.8 -> release 1; strict: invalid box -> 0
    assert _both("depth", _think(_area(_box(0.5, 0, 1.2, 1, 0.8))), target) == (1.0, 0.0)
    # a flat box at x = 0.6 still spans pixel column floor(2.4) = 2 .. ceil(2.4) = 3: m = 0.8 -> release 1
    assert _both("depth", _think(_area(_box(0.6, 0, 0.6, 1, 0.8))), target) == (1.0, 0.0)
    # a flat box on the pixel edge x = 0.5 (floor(2) = ceil(2)) has no pixels: a miss in both
    assert _both("depth", _think(_area(_box(0.5, 0, 0.5, 1, 0.8))), target) == (0.0, 0.0)
    # a string depth is a miss in both
    assert _both("depth", _think(_area(_box(0.5, 0, 1, 1, '"0.8"'))), target) == (0.0, 0.0)


def test_depth_unreadable_area_counts_one_entry() -> None:
    # release: entries = 1 ([] of the unreadable area) + 1 -> the one hit gives 1/2; strict counts boxes: 1/1
    text = _think("<area>oops</area>", _area(_box(0.5, 0, 1, 1, 0.8)))
    assert _both("depth", text, _target(depth=_halves())) == (0.5, 1.0)


def test_one_box_depth_rule_in_both_profiles() -> None:
    # Issue 13's case: every row [.2, .8, .8, .8], box x ∈ [.2, .5] -> columns 0..1 -> m = 0.5 (the writer's
    # value). Stated 0.5: a hit in both; stated 0.8 (the old reward's m): a miss in both (|.5 − .8| / .5 = 0.6).
    target = _target(gt_boxes=[[0.2, 0.0, 0.5, 1.0]], depth=torch.tensor([0.2, 0.8, 0.8, 0.8]).repeat(4, 1))
    assert _both("depth", _think(_area(_box(0.2, 0, 0.5, 1, 0.5))), target) == (1.0, 1.0)
    assert _both("depth", _think(_area(_box(0.2, 0, 0.5, 1, 0.8))), target) == (0.0, 0.0)


# ------------------------------------------------------------------------------------------------- progress


def test_release_progress_reward() -> None:
    assert release_progress_reward(1.0, None) == 1.0  # first visit
    assert release_progress_reward(1.0, 0.25) == 1.75  # 1 + (1 − 0.25)
    assert release_progress_reward(0.5, 0.5) == 0.5  # s = s_prev: + 0
    assert release_progress_reward(0.0, 0.5) == 0.0  # s < s_prev: s


def _visits(profile: str, visits: list[list[str]]) -> tuple[list[list[float]], AnswerProgress]:
    progress, target, out = AnswerProgress(), _target(), []
    for answers in visits:
        texts = [f"<answer>{a}</answer>" for a in answers]
        batch = score_completions(
            texts, [0] * len(texts), [target], weights=RewardWeights(profile=profile), progress=progress
        )
        out.append(batch.terms["answer"].tolist())
    return out, progress


def test_progress_stores_the_mean_reward_including_the_bonus() -> None:
    visits = [["B", "C"], ["B", "C"], ["B", "C"]]
    # release: v1 (1, 0), stores 0.5; v2 1 ≥ 0.5 -> (1.5, 0), stores 0.75; v3 -> (1 + 0.25, 0) = (1.25, 0)
    got, progress = _visits("release", visits)
    assert got == [[1.0, 0.0], [1.5, 0.0], [1.25, 0.0]]
    assert progress.get("r0") == pytest.approx((1.25 + 0.0) / 2)
    # strict stores the mean score s (0.5 every time): (1, 0), (1.5, 0), (1.5, 0)
    got, progress = _visits("strict", visits)
    assert got == [[1.0, 0.0], [1.5, 0.0], [1.5, 0.0]]
    assert progress.get("r0") == 0.5


def test_progress_never_stores_a_zero_mean() -> None:
    # release: v1 all wrong, mean 0 not stored -> v2 is a first visit: (1, 0). Strict: s_prev = 0 -> (2, 0)
    visits = [["C", "C"], ["B", "C"]]
    assert _visits("release", visits)[0][1] == [1.0, 0.0]
    assert _visits("strict", visits)[0][1] == [2.0, 0.0]
    # a zero mean leaves the old value: release v1 stores 0.5, v2 (0, 0) keeps it, v3 (1, 1) -> 1.5 each;
    # strict stores 0 at v2 -> v3 (2, 2)
    visits = [["B", "C"], ["C", "C"], ["B", "B"]]
    got, progress = _visits("release", visits)
    assert got[2] == [1.5, 1.5] and progress.get("r0") == 1.5
    assert _visits("strict", visits)[0][2] == [2.0, 2.0]


# ---------------------------------------------------------------------------------------------------- total


def test_release_total_is_the_weighted_sum() -> None:
    depth = torch.full((4, 4), 0.2)
    target = _target(gt_boxes=[[0.0, 0.0, 0.5, 0.5]], depth=depth)
    text = "Answer: " + _think(_area(_box(0, 0, 0.5, 0.5, 0.2)))  # unanchored: format 1, answer 1, IoU 1, depth 1
    out = score_completions([text], [0], [target], weights=RewardWeights(format=2.0, depth=0.5, profile="release"))
    assert [out.terms[k].item() for k in ("format", "answer", "grounding", "depth")] == [1.0, 1.0, 1.0, 1.0]
    assert out.total.item() == pytest.approx(2 + 1 + 1 + 0.5)
    assert out.answer_scores.tolist() == [1.0]
