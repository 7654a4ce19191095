"""Answer normalisation and scoring rules used by the answer reward and the evaluation."""

import pytest

from engine.data.answers import answers_match, normalize_answer


@pytest.mark.parametrize(
    "pred, gold, kind, expected",
    [
        ("B", "B", "choice", 1.0),
        ("(B)", "B", "choice", 1.0),
        ("B. the red cube", "B", "choice", 1.0),
        ("The answer is C", "B", "choice", 0.0),
        ("Option b", "B", "choice", 1.0),
        ("the red cube", "(B) red cube", "choice", 1.0),
        ("the blue cube", "(B) red cube", "choice", 0.0),
        ("answer is a red cube", "(B) a red cube", "choice", 1.0),
        ("3", "3", "number", 1.0),
        ("There are three cups.", "3", "number", 1.0),
        ("4", "3", "number", 0.0),
        ("20", "19", "number", 0.0),
        ("1,024", "1024", "number", 1.0),
        ("2.4", "2.5", "number", 1.0),
        ("2.0", "2.5", "number", 0.0),
        ("There are no cups", "0", "number", 1.0),
        ("nothing", "2", "number", 0.0),
        ("Closer.", "nearer", "word", 1.0),
        ("The GRAY one", "grey", "word", 1.0),
        ("left", "right", "word", 0.0),
        ("Yes", "yes", "word", 1.0),
        ("true", "yes", "word", 1.0),
        ("[0.1, 0.1, 0.5, 0.5]", "[0.1,0.1,0.5,0.5]", "box", 1.0),
        ("[0.5, 0.5, 0.9, 0.9]", "[0.1,0.1,0.4,0.4]", "box", 0.0),
        ("[0.5, 0.5, 0.4, 0.9]", "[0.1,0.1,0.4,0.4]", "box", 0.0),
        ("", "B", "choice", 0.0),
        (None, "3", "number", 0.0),
    ],
)
def test_answers_match(pred, gold, kind, expected):
    assert answers_match(pred, gold, kind) == pytest.approx(expected)


def test_box_score_is_iou():
    # boxes [0,0,.5,.5] and [.25,0,.75,.5]: intersection .125, union .375
    assert answers_match("[0, 0, 0.5, 0.5]", "[0.25, 0, 0.75, 0.5]", "box") == pytest.approx(1 / 3)


def test_choice_text_via_options():
    assert answers_match("the green sphere", "C", "choice", options={"C": "The green sphere"}) == 1.0
    assert answers_match("the green sphere", "B", "choice", options={"C": "The green sphere"}) == 0.0


def test_relative_tolerance_for_non_integer_gold():
    assert answers_match("1.09", "1.0001", "number", rel_tol=0.1) == 1.0
    assert answers_match("1.2", "1.0001", "number", rel_tol=0.1) == 0.0


def test_normalize_answer():
    assert normalize_answer("The answer is (D).", "choice") == "D"
    assert normalize_answer("five", "number") == "5"
    assert normalize_answer("about 2.50 m", "number") == "2.5"
    assert normalize_answer("The Farthest", "word") == "farther"
    assert normalize_answer("box: [0.1000, 0.2, 0.3, 0.4]", "box") == "[0.1,0.2,0.3,0.4]"
    assert normalize_answer("no box", "box") == ""
    with pytest.raises(ValueError, match="unknown answer_type 'colour'"):
        normalize_answer("red", "colour")
