"""SIF trace format: canonical writer, strict/total parser, crop-hook helper, prompt content."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.data.sif_format import (
    SIF_INSTRUCTION,
    DepthBox,
    format_response,
    last_area_boxes,
    parse_response,
    sif_user_content,
    strip_instruction,
)

RELEASED_INSTRUCTION = (
    " Please first output the thinking process in <think> </think> tags, where bounding box is enclosed in <area> "
    "</area> tags and text analysis is enclosed in <text> </text> tags, alternating between them to iteratively "
    "refine the focused area. Then output the final answer in <answer> </answer> tags."
)
RESERVED = ("<think>", "</think>", "<area>", "</area>", "<text>", "</text>", "<answer>", "</answer>")


@st.composite
def depth_boxes(draw) -> DepthBox:
    """A box on the 3-decimal grid with x2 > x1, y2 > y1."""
    x1 = draw(st.integers(0, 999))
    x2 = draw(st.integers(x1 + 1, 1000))
    y1 = draw(st.integers(0, 999))
    y2 = draw(st.integers(y1 + 1, 1000))
    d = draw(st.integers(0, 1000))
    return DepthBox(x1 / 1000, y1 / 1000, x2 / 1000, y2 / 1000, d / 1000)


free_text = st.text(min_size=1, max_size=30).filter(lambda s: s.strip() and not any(t in s for t in RESERVED))


@st.composite
def responses(draw):
    n = draw(st.integers(1, 5))
    areas = [draw(st.lists(depth_boxes(), min_size=1, max_size=3)) for _ in range(n)]
    texts = [draw(free_text) for _ in range(n)]
    return areas, texts, draw(free_text)


def test_instruction_is_the_released_one_and_prompt_layout():
    assert SIF_INSTRUCTION == RELEASED_INSTRUCTION
    parts = sif_user_content("Is the cup left of the ball?")
    assert [p["type"] for p in parts] == ["text", "image", "text", "image", "text"]
    text = "".join(p.get("text", "<img>") for p in parts)
    assert text == "Original image: <img>\nDepth image: <img>\nIs the cup left of the ball?" + RELEASED_INSTRUCTION
    no_depth = sif_user_content("Q?", with_depth=False)
    assert "".join(p.get("text", "<img>") for p in no_depth) == "Original image: <img>\nQ?" + RELEASED_INSTRUCTION
    assert strip_instruction(parts[-1]["text"]) == "Is the cup left of the ball?"


def test_writer_exact_string():
    s = format_response(
        [[DepthBox(0, 0, 1, 1, 0.5)], [DepthBox(0.1, 0.25, 0.3004, 0.4, 0.12345), DepthBox(0.5, 0.5, 0.6, 0.7, 1)]],
        ["whole image", "the cup"],
        "B",
    )
    assert s == (
        '<think><area>[{"bbox_2d":[0.0,0.0,1.0,1.0],"depth":0.5}]</area><text>whole image</text>'
        '<area>[{"bbox_2d":[0.1,0.25,0.3,0.4],"depth":0.123},{"bbox_2d":[0.5,0.5,0.6,0.7],"depth":1.0}]</area>'
        "<text>the cup</text></think><answer>B</answer>"
    )


@settings(max_examples=150, deadline=None)
@given(responses())
def test_round_trip(resp):
    areas, texts, answer = resp
    s = format_response(areas, texts, answer)
    parsed = parse_response(s)
    assert parsed.error is None
    assert parsed.areas == areas and parsed.texts == texts and parsed.answer == answer
    assert format_response(parsed.areas, parsed.texts, parsed.answer) == s


def test_released_style_whitespace_is_well_formed():
    s = (
        '<think>\n<area>[{"bbox_2d": [0.1, 0.2, 0.5, 0.6], "depth": 0.25}]</area>\n<text>a cup</text>\n'
        "</think>\n<answer>\nleft\n</answer>\n"
    )
    p = parse_response(s)
    assert p.error is None
    assert p.areas == [[DepthBox(0.1, 0.2, 0.5, 0.6, 0.25)]] and p.texts == ["a cup"] and p.answer == "\nleft\n"


GOOD_AREA = '<area>[{"bbox_2d":[0.1,0.2,0.5,0.6],"depth":0.3}]</area>'


def _wrap(area: str, text: str = "t", answer: str = "a") -> str:
    return f"<think>{area}<text>{text}</text></think><answer>{answer}</answer>"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "expected <think> first"),
        ("hello", "expected <think> first"),
        ("x" + _wrap(GOOD_AREA), "text before <think>"),
        ("<think></think><answer>a</answer>", "expected <area> after <think>"),
        (_wrap(GOOD_AREA)[: -len("</answer>")], "expected </answer>"),
        (_wrap(GOOD_AREA) + "tail", "text after </answer>"),
        (_wrap(GOOD_AREA, text=" "), "text 0 is empty"),
        (_wrap(GOOD_AREA, answer=" "), "answer is empty"),
        (_wrap(GOOD_AREA).replace("<text>t</text>", ""), "area 0: expected <text>"),
        (_wrap(GOOD_AREA + "<text>t</text>" + GOOD_AREA + GOOD_AREA), "area 1: expected <text>"),
        (_wrap(GOOD_AREA).replace("</think>", "<text>u</text></think>"), "expected <area> or </think> after text 0"),
        (_wrap(GOOD_AREA).replace("<answer>", "<think><answer>"), "expected <answer> after </think>"),
        (_wrap(GOOD_AREA) + "<answer>b</answer>", "unexpected <answer>"),
        (_wrap("<area>[{'bbox_2d':[0.1,0.2,0.5,0.6],'depth':0.3}]</area>"), "area 0: invalid JSON"),
        (_wrap("<area>[]</area>"), "area 0: empty list"),
        (_wrap('<area>{"bbox_2d":[0.1,0.2,0.5,0.6],"depth":0.3}</area>'), "area 0: payload must be a JSON list"),
        (_wrap('<area>[{"bbox_2d":[0.1,0.2,0.5],"depth":0.3}]</area>'), "area 0: box 0: field 'bbox_2d'"),
        (_wrap('<area>[{"bbox_2d":[0.1,0.2,0.5,0.6]}]</area>'), "area 0: box 0: field 'depth' missing"),
        (_wrap('<area>[{"bbox_2d":[0.1,0.2,0.5,0.6],"depth":true}]</area>'), "field 'depth' must be a number"),
        (_wrap('<area>[{"bbox_2d":[0.1,0.2,0.5,0.6],"depth":NaN}]</area>'), "non-finite number NaN"),
        (_wrap('<area>[{"bbox_2d":[0.1,0.2,0.5,0.6],"depth":1.5}]</area>'), "depth=1.5 outside [0, 1]"),
        (_wrap('<area>[{"bbox_2d":[0.5,0.2,0.5,0.6],"depth":0.3}]</area>'), "x2=0.5 must exceed x1=0.5"),
        (_wrap('<area>[{"bbox_2d":[0.1,0.7,0.5,0.6],"depth":0.3}]</area>'), "y2=0.6 must exceed y1=0.7"),
        (
            _wrap(
                GOOD_AREA + '<text>t</text><area>[{"bbox_2d":[0.1,0.2,0.5,0.6],"depth":0.3},'
                '{"bbox_2d":[0.1,0.2,0.5,0.6001],"depth":0.3}]</area>'
            ),
            "area 1: box 1: y2=0.6001 has more than 3 decimals",
        ),
    ],
)
def test_malformed_names_the_fault(text, expected):
    parsed = parse_response(text)
    assert parsed.error is not None and expected in parsed.error, parsed.error


def test_extra_box_fields_are_tolerated_as_in_the_release():
    p = parse_response(_wrap('<area>[{"bbox_2d":[0.1,0.2,0.5,0.6],"depth":0.3,"label":"cup"}]</area>'))
    assert p.error is None and p.areas == [[DepthBox(0.1, 0.2, 0.5, 0.6, 0.3)]]


def test_lenient_extraction_from_malformed():
    s = (
        '<think><area>[{"bbox_2d":[0.1,0.2,0.5,0.6]},{"bbox_2d":[0.2,0.2,0.3,0.3],"depth":0.4}]</area>'
        "<text>x</text><area>not json</area>junk</think><answer>C</answer>"
    )
    p = parse_response(s)
    assert p.error is not None
    assert len(p.areas) == 2 and p.areas[1] == []
    assert p.areas[0][0][:4] == (0.1, 0.2, 0.5, 0.6) and math.isnan(p.areas[0][0].depth)
    assert p.areas[0][1] == DepthBox(0.2, 0.2, 0.3, 0.3, 0.4)
    assert p.texts == ["x"] and p.answer == "C"


def test_writer_rejects_bad_pieces():
    box = DepthBox(0.1, 0.1, 0.2, 0.2, 0.5)
    with pytest.raises(ValueError, match="equally many"):
        format_response([[box]], [], "a")
    with pytest.raises(ValueError, match="area 0: needs at least one box"):
        format_response([[]], ["t"], "a")
    with pytest.raises(ValueError, match="area 1 box 0: x2"):
        format_response([[box], [DepthBox(0.1, 0.1, 0.1004, 0.2, 0.5)]], ["t", "u"], "a")
    with pytest.raises(ValueError, match="text 0 contains the reserved tag '</text>'"):
        format_response([[box]], ["a</text>"], "a")
    with pytest.raises(ValueError, match="answer must be a non-empty"):
        format_response([[box]], ["t"], "")


def test_last_area_boxes():
    s = format_response([[DepthBox(0, 0, 1, 1, 0.5)], [DepthBox(0.1, 0.2, 0.3, 0.4, 0.2)]], ["a", "b"], "x")
    first_close = s.index("</area>") + len("</area>")
    assert last_area_boxes(s[:first_close]) == [DepthBox(0.0, 0.0, 1.0, 1.0, 0.5)]
    second_close = s.rindex("</area>") + len("</area>")
    assert last_area_boxes(s[:second_close] + "\n") == [DepthBox(0.1, 0.2, 0.3, 0.4, 0.2)]
    assert last_area_boxes(s[: second_close - 1]) is None
    assert last_area_boxes(s) is None
    assert last_area_boxes("</area>") is None
    mixed = '<area>[{"bbox_2d":[0.3,0.2,0.1,0.4],"depth":0.2},{"bbox_2d":[0.1,0.2,0.3,0.4],"depth":0.21234}]</area>'
    assert last_area_boxes(mixed) == [DepthBox(0.1, 0.2, 0.3, 0.4, 0.21234)]
    assert last_area_boxes('<area>[{"bbox_2d":[0.3,0.2,0.1,0.4],"depth":0.2}]</area>') is None


def _check_invariants(text: str) -> None:
    p = parse_response(text)
    assert isinstance(p.areas, list) and isinstance(p.texts, list)
    assert p.error is None or isinstance(p.error, str)
    if p.error is None:
        assert len(p.areas) == len(p.texts) >= 1 and p.answer is not None and p.answer.strip()
        for boxes in p.areas:
            assert boxes
            for b in boxes:
                assert 0 <= b.x1 < b.x2 <= 1 and 0 <= b.y1 < b.y2 <= 1 and 0 <= b.depth <= 1
                assert all(round(v, 3) == v for v in b)
        assert all(t.strip() for t in p.texts)
        again = parse_response(format_response(p.areas, p.texts, p.answer))
        assert again.error is None and again.areas == p.areas
    boxes = last_area_boxes(text)
    assert boxes is None or all(0 <= b.x1 < b.x2 <= 1 and 0 <= b.y1 < b.y2 <= 1 for b in boxes)


fragments = st.sampled_from(
    list(RESERVED)
    + [
        "[",
        "]",
        "{",
        "}",
        ",",
        ":",
        '"bbox_2d"',
        '"depth"',
        "0.1",
        "0.5",
        "1",
        "-1",
        "1e400",
        "NaN",
        "true",
        "null",
        " ",
        "\n",
        "x",
        "[[[[[[[[",
        '"',
        "\\",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), st.lists(fragments, max_size=60).map("".join)))
def test_fuzz_never_raises(text):
    _check_invariants(text)


@settings(max_examples=200, deadline=None)
@given(responses(), st.data())
def test_fuzz_mutated_valid_responses(resp, data):
    s = format_response(*resp)
    i = data.draw(st.integers(0, len(s)))
    j = data.draw(st.integers(i, min(len(s), i + 8)))
    insert = data.draw(st.one_of(st.text(max_size=4), fragments))
    _check_invariants(s[:i] + insert + s[j:])


def test_pathological_inputs_survive():
    _check_invariants(_wrap("<area>" + "[" * 100_000 + "</area>"))
    _check_invariants(_wrap('<area>[{"bbox_2d":[' + "9" * 10_000 + ',0,1,1],"depth":0}]</area>'))
    _check_invariants("<area>" * 20_000 + "</area>")
