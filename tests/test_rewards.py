"""GRPO-SIF rewards against hand-computed cases (expected numbers worked out from the formulas in the comments)."""

import pytest
import torch

from engine.data.sif_format import DepthBox, format_response, parse_response
from engine.rl.iou import box_set_iou, matched_iou, union_iou
from engine.rl.rewards import (
    AnswerProgress,
    RewardTarget,
    RewardWeights,
    answer_score,
    depth_reward,
    format_reward,
    grounding_reward,
    progress_reward,
    score_completions,
)

FULL = DepthBox(0.0, 0.0, 1.0, 1.0, 0.5)


def _response(areas: list[list[DepthBox]], answer: str = "B") -> str:
    return format_response(areas, [f"step {i}" for i in range(len(areas))], answer)


def _target(**kw) -> RewardTarget:
    base = dict(record_id="r0", question="q?", answer="B", answer_type="choice", gt_boxes=[[0.5, 0.5, 1.0, 1.0]])
    base.update(kw)
    return RewardTarget(**base)


# ------------------------------------------------------------------------------------------------------- IoU


def test_union_iou_overlapping_boxes_is_exact() -> None:
    # ∪P = [0,2]² ∪ [1,3]² has area 4 + 4 − 1 = 7 and contains G = [1,2]² (area 1): IoU = 1/7.
    assert union_iou([[0, 0, 2, 2], [1, 1, 3, 3]], [[1, 1, 2, 2]]) == pytest.approx(1 / 7)
    # two halves tile the gt exactly: 1.0, while the one-to-one matching gives (0.5 + 0) / max(2, 1) = 0.25.
    halves = [[0, 0, 0.5, 1], [0.5, 0, 1, 1]]
    assert union_iou(halves, [[0, 0, 1, 1]]) == pytest.approx(1.0)
    assert matched_iou(halves, [[0, 0, 1, 1]]) == pytest.approx(0.25)
    assert box_set_iou(halves, [[0, 0, 1, 1]]) == pytest.approx(0.625)


def test_matched_iou_picks_the_best_assignment() -> None:
    # pairwise IoU: P0–G0 0.5, P0–G1 1, P1–G0 1, P1–G1 0.5; the optimum pairs P0→G1 and P1→G0: (1 + 1) / 2 = 1.
    pred = [[0, 0, 2, 1], [0, 0, 1, 1]]
    gt = [[0, 0, 1, 1], [0, 0, 2, 1]]
    assert matched_iou(pred, gt) == pytest.approx(1.0)
    assert matched_iou([], gt) == 0.0 and union_iou([], gt) == 0.0


# ---------------------------------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '<think><area>[{"bbox_2d":[0.1,0.2,0.5,0.6],"depth":0.3}]</area><text>look</text></think>'
            "<answer>B</answer>",
            1.0,
        ),
        # no answer block
        ('<think><area>[{"bbox_2d":[0.1,0.2,0.5,0.6],"depth":0.3}]</area><text>look</text></think>', 0.0),
        # blank answer
        (
            '<think><area>[{"bbox_2d":[0.1,0.2,0.5,0.6],"depth":0.3}]</area><text>look</text></think>'
            "<answer>  </answer>",
            0.0,
        ),
        # x2 < x1
        (
            '<think><area>[{"bbox_2d":[0.5,0.2,0.1,0.6],"depth":0.3}]</area><text>look</text></think>'
            "<answer>B</answer>",
            0.0,
        ),
        # depth outside [0, 1]
        (
            '<think><area>[{"bbox_2d":[0.1,0.2,0.5,0.6],"depth":1.5}]</area><text>look</text></think>'
            "<answer>B</answer>",
            0.0,
        ),
        # text before area: not alternating area/text
        (
            '<think><text>look</text><area>[{"bbox_2d":[0.1,0.2,0.5,0.6],"depth":0.3}]</area></think>'
            "<answer>B</answer>",
            0.0,
        ),
        # an empty area
        ("<think><area>[]</area><text>look</text></think><answer>B</answer>", 0.0),
    ],
)
def test_format_reward(text: str, expected: float) -> None:
    assert format_reward(parse_response(text)) == expected


# ---------------------------------------------------------------------------------------------------- answer


def test_answer_score_rules_and_missing_answer() -> None:
    target = _target()
    assert answer_score("B", target) == 1.0
    assert answer_score("C", target) == 0.0
    assert answer_score(None, target) == 0.0
    assert answer_score("   ", target) == 0.0
    # the reference appearing in the thinking does not count: no <answer> block, score 0
    parsed = parse_response("<think><area>[]</area><text>it is B</text></think>")
    assert answer_score(parsed.answer, target) == 0.0


def test_answer_judge_hook_is_used_only_for_configured_types() -> None:
    calls = []

    def judge(question: str, prediction: str, reference: str) -> float:
        calls.append((question, prediction, reference))
        return 0.7

    word = _target(answer="red", answer_type="word")
    assert answer_score("crimson", word, judge, judge_types=("word",)) == 0.7
    assert calls == [("q?", "crimson", "red")]
    assert answer_score("B", _target(), judge, judge_types=("word",)) == 1.0  # choice: rule, not the judge
    assert len(calls) == 1
    with pytest.raises(ValueError, match="r0"):
        answer_score("crimson", word, lambda q, p, r: 2.0, judge_types=("word",))


def test_progress_reward() -> None:
    assert progress_reward(1.0, None) == 1.0  # first visit: no progress term
    assert progress_reward(1.0, 0.25) == 1.75  # 1 + (1 − 0.25)
    assert progress_reward(0.0, 0.5) == 0.0  # regress: no penalty beyond s


def test_answer_progress_across_visits_and_checkpoint() -> None:
    target = _target()
    progress = AnswerProgress()
    right, wrong = _response([[FULL]], "B"), _response([[FULL]], "C")
    # visit 1: s = (1, 0), no s_prev -> (1, 0); stores mean 0.5
    r1 = score_completions([right, wrong], [0, 0], [target], progress=progress)
    assert r1.terms["answer"].tolist() == [1.0, 0.0]
    # visit 2: s = (1, 1), s_prev = 0.5 -> 1 + 0.5 each; stores 1.0
    r2 = score_completions([right, right], [0, 0], [target], progress=progress)
    assert r2.terms["answer"].tolist() == [1.5, 1.5]
    restored = AnswerProgress()
    restored.load_state_dict(progress.state_dict())
    assert restored.get("r0") == 1.0
    # visit 3: s = (1, 0), s_prev = 1 -> (1 + 0, 0)
    r3 = score_completions([right, wrong], [0, 0], [target], progress=restored)
    assert r3.terms["answer"].tolist() == [1.0, 0.0]


# ------------------------------------------------------------------------------------------------- grounding


def test_grounding_with_progress_from_first_non_full_area() -> None:
    gt = [[0.5, 0.5, 1.0, 1.0]]
    start = [DepthBox(0.25, 0.25, 1.0, 1.0, 0.5)]  # overlap 0.25 / union 0.5625 = 4/9 (both IoUs)
    end = [DepthBox(0.5, 0.5, 1.0, 1.0, 0.5)]  # exact: 1
    # the full-image area is skipped for the start: 1 + (1 − 4/9) = 14/9
    assert grounding_reward([[FULL], start, end], gt) == pytest.approx(14 / 9)
    # getting worse: end 4/9, start 1 -> 4/9 + 0
    assert grounding_reward([[FULL], end, start], gt) == pytest.approx(4 / 9)
    # only full-image areas: start = none, just IoU_end = IoU([0,1]², gt) = 0.25
    assert grounding_reward([[FULL]], gt) == pytest.approx(0.25)
    assert grounding_reward([], gt) == 0.0


def test_grounding_multi_box_area() -> None:
    # ∪P covers [0,.5]² ∪ [.5,1]² (area 0.5) ⊇ gt (0.25): union IoU 0.5; matched (1 + 0) / 2 = 0.5 -> 0.5
    area = [DepthBox(0.0, 0.0, 0.5, 0.5, 0.1), DepthBox(0.5, 0.5, 1.0, 1.0, 0.1)]
    assert grounding_reward([area], [[0.5, 0.5, 1.0, 1.0]]) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------------- depth


def test_depth_reward_tolerance() -> None:
    # |0.2 − 0.21| = 0.01 ≤ 0.02 ✓; |0.8 − 0.75| = 0.05 ≤ 0.08 ✓; |0.5 − 0.56| = 0.06 > 0.05 ✗ -> 2/3
    assert depth_reward([0.21, 0.75, 0.56], [0.2, 0.8, 0.5]) == pytest.approx(2 / 3)
    # mean depth 0: tolerance is 5e-4, so 0.0 is right and 0.001 is wrong -> 1/2
    assert depth_reward([0.0, 0.001], [0.0, 0.0]) == pytest.approx(0.5)
    assert depth_reward([], []) == 0.0


def test_depth_reward_measures_the_map_inside_each_box() -> None:
    depth = torch.full((4, 4), 0.2)
    depth[:, 2:] = 0.8  # left half 0.2, right half 0.8, whole image mean 0.5
    areas = [
        [DepthBox(0.0, 0.0, 0.5, 1.0, 0.21), DepthBox(0.5, 0.0, 1.0, 1.0, 0.75)],
        [DepthBox(0.0, 0.0, 1.0, 1.0, 0.56)],
    ]
    target = _target(gt_boxes=[[0.0, 0.0, 0.5, 1.0]], depth=depth)
    out = score_completions([_response(areas)], [0], [target])
    assert out.terms["depth"].item() == pytest.approx(2 / 3)  # as in test_depth_reward_tolerance
    no_depth = score_completions([_response(areas)], [0], [_target()])
    assert no_depth.terms["depth"].item() == 0.0


# ------------------------------------------------------------------------------------------------------ total


def test_total_is_the_weighted_sum_and_metrics_are_named() -> None:
    depth = torch.full((4, 4), 0.2)
    target = _target(gt_boxes=[[0.0, 0.0, 0.5, 0.5]], depth=depth)
    good = _response([[DepthBox(0.0, 0.0, 0.5, 0.5, 0.2)]], "B")  # format 1, answer 1, grounding 1, depth 1
    bad = "<think>no boxes</think><answer>B</answer>"  # format 0, answer 1, grounding 0, depth 0
    out = score_completions([good, bad], [0, 0], [target], weights=RewardWeights(format=2.0, depth=0.5))
    assert out.terms["format"].tolist() == [1.0, 0.0]
    assert out.terms["grounding"].tolist() == [1.0, 0.0]
    assert out.total.tolist() == pytest.approx([2 + 1 + 1 + 0.5, 1.0])
    names = ("format", "answer", "grounding", "depth", "total", "accuracy")
    assert set(out.metrics()) == {f"reward/{k}" for k in names}
    assert out.metrics()["reward/total"] == pytest.approx((4.5 + 1.0) / 2)


def test_bad_prompt_index_is_named() -> None:
    with pytest.raises(IndexError, match="completion 1"):
        score_completions(["a", "b"], [0, 3], [_target()])


def test_http_judge_posts_json_and_reads_the_score() -> None:
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from engine.rl.rewards import http_judge

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            reply = json.dumps({"score": 0.25} if len(seen) == 1 else {"verdict": "yes"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        judge = http_judge(f"http://127.0.0.1:{server.server_port}/score", timeout_s=5)
        assert answer_score("crimson", _target(answer="red", answer_type="word"), judge, ("word",)) == 0.25
        assert seen == [{"question": "q?", "prediction": "crimson", "reference": "red"}]
        with pytest.raises(ValueError, match="numeric 'score'"):
            judge("q", "p", "r")
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------ one box mean depth (§4)


def test_writer_reward_and_crop_op_agree_on_a_box_mean_depth() -> None:
    # Issue 13's case: every row of a 4x4 map is [.2, .8, .8, .8]; box x ∈ [.2, .5] covers pixel columns
    # floor(.2·4) = 0 .. ceil(.5·4) − 1 = 1, so its mean is (.2 + .8) / 2 = 0.5 (all rows).
    from engine.data.boxes import box_mean_depth
    from engine.ops import crop_boxes
    from engine.rl.rewards import box_mean_depths

    depth = torch.tensor([0.2, 0.8, 0.8, 0.8]).repeat(4, 1)
    box = DepthBox(0.2, 0.0, 0.5, 1.0, 0.5)
    assert box_mean_depth(depth, box[:4]) == pytest.approx(0.5)
    assert box_mean_depths([depth], [(0, box)]) == [pytest.approx(0.5)]
    # the op on the same box in pixel coordinates [0.8, 0, 2, 4]: median 0.2 (lower), mean 0.5, min 0.2
    stats = crop_boxes(
        torch.zeros(1, 4, 4, 3, dtype=torch.uint8),
        torch.tensor([[0.8, 0.0, 2.0, 4.0]]),
        torch.zeros(1, dtype=torch.int64),
        1,
        depth=depth[None],
    ).depth_stats
    torch.testing.assert_close(stats, torch.tensor([[0.2, 0.5, 0.2]]))
    # so a trace that states the writer's 0.5 is right in both profiles
    target = _target(gt_boxes=[[0.2, 0.0, 0.5, 1.0]], depth=depth)
    for profile in ("strict", "release"):
        out = score_completions([_response([[box]])], [0], [target], weights=RewardWeights(profile=profile))
        assert out.terms["depth"].item() == 1.0, profile
