"""The tiny default's initialisation must let it learn a question that needs two facts together
(``benchmarks.init_learning``: is the query among the listed tokens, behind a 40-token constant preamble). From
N(0, 0.02²) weights, the init of large checkpoints, the tiny decoder stays at chance on it for 400 steps."""

from benchmarks.init_learning import main, train
from engine.models.model import VLModel
from engine.models.tiny import init_weights, tiny_config


def test_the_default_init_learns_a_two_fact_question() -> None:
    curve = train(None, "preamble", steps=150, eval_every=150)
    assert curve[0][1] < 0.6, curve  # the untrained model is at chance or below
    assert curve[-1][1] >= 0.9, f"held-out accuracy after 150 steps (chance 0.5): {curve}"


def test_fan_in_init_scales_each_matrix_by_its_fan_in() -> None:
    model = VLModel(tiny_config())
    init_weights(model, seed=0)
    for name, p in model.named_parameters():
        if p.dim() >= 2 and p.numel() >= 4096:
            expected = p.shape[1:].numel() ** -0.5
            assert abs(p.std().item() / expected - 1) < 0.1, name


def test_cli_prints_a_curve_table(capsys) -> None:
    main(["--inits", "fan-in", "--variants", "plain", "--steps", "2", "--eval-every", "1"])
    table = "| init | variant | 0 | 1 | 2 | seconds |\n|---|---|---|---|---|---|\n| fan-in | plain | "
    assert table in capsys.readouterr().out
