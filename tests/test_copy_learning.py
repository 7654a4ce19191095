"""The tiny decoder learns to copy (``benchmarks.copy_learning``), and the benchmark's names task scores exactly the
object words the question gives (not the colour an attribute trace reads from the image)."""

import json
import random

from benchmarks.copy_learning import engine_model, induction_examples, main, names_examples, train
from engine.models.tiny import tiny_tokenizer


def test_the_tiny_decoder_learns_induction_in_150_steps() -> None:
    held_out = induction_examples(random.Random(1), 64)
    curve = train(engine_model, induction_examples, held_out, steps=150, eval_every=150, lr=3e-3, batch_size=16)
    assert curve[0][1] < 0.05, curve  # random ids: the untrained model does not copy
    assert curve[-1][1] >= 0.9, f"held-out copy accuracy after 150 steps: {curve}"


def _record(question: str, first_text: str) -> dict:
    trace = [
        {"boxes": [{"bbox_2d": [0.0, 0.0, 1.0, 1.0], "depth": 0.4}], "text": first_text},
        {"boxes": [{"bbox_2d": [0.1, 0.1, 0.3, 0.3], "depth": 0.5}], "text": "done: 1."},
    ]
    return {
        "id": "r0",
        "image": "x.png",
        "question": question,
        "answer": "1",
        "answer_type": "number",
        "gt_boxes": [],
        "width": 224,
        "height": 224,
        "trace": trace,
    }


def _scored_words(tmp_path, question: str, first_text: str, with_prompt: bool) -> list[str]:
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(_record(question, first_text)) + "\n")
    tok = tiny_tokenizer().tok
    examples = names_examples(path, with_prompt)
    return [tok.decode([i]).strip() for ids, scored in examples for i, s in zip(ids, scored) if s]


def test_names_scores_the_objects_the_question_names(tmp_path) -> None:
    question = "Is the blue sphere to the left or to the right of the red cube?"
    text = "Find the blue sphere and the red cube."
    assert "".join(_scored_words(tmp_path, question, text, False)) == "bluesphereredcube"
    assert "".join(_scored_words(tmp_path, question, text, True)) == "bluesphereredcube"


def test_names_leaves_out_an_object_read_from_the_image(tmp_path) -> None:
    question = "What color is the cube that is farthest from the camera?"
    assert _scored_words(tmp_path, question, "Find the cyan cube.", False) == []


def test_cli_prints_a_curve_table(capsys) -> None:
    main(["--tasks", "names", "--steps", "2", "--eval-every", "1", "--no-peer"])
    out = capsys.readouterr().out
    assert "| task | model | 0 | 1 | 2 | seconds |" in out
    assert "| names | ours | " in out
