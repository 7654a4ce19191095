"""Run configuration: plain dataclasses (``sections``), loaded from a recipe's defaults, a config file and the
command line (``loading``).

A recipe composes its config from section dataclasses, one field per section::

    @dataclass
    class GRPORecipeConfig:
        model: ModelSection = field(default_factory=ModelSection)
        data: DataConfig = field(default_factory=DataConfig)
        train: TrainConfig = field(default_factory=TrainConfig)
        lora: LoRAConfig = field(default_factory=LoRAConfig)
        rl: RLConfig = field(default_factory=RLConfig)   # the RL engine's own section

and loads it with ``load_config(GRPORecipeConfig(...recipe defaults...), sys.argv[1:])``. Precedence, lowest first:
the recipe's defaults, then ``--config FILE`` (JSON, or TOML via tomllib: tables are sections), then dotted CLI
overrides ``--train.lr 1e-5 --rl.num_generations 8`` (also ``--train.lr=1e-5``). Values are parsed and checked
against each field's annotation (bool, int, float, str, ``X | None``, ``Literal[...]``, ``tuple[...]``,
``list[...]``, nested dataclasses); an unknown key is an error naming it and the nearest valid key. Sections nest to
any depth, so any dataclass tree works. ``--resume`` is shorthand for ``--train.resume true``. A recipe's ``main``
decorated with :func:`exit_on_config_error` prints a ConfigError as one line on rank 0 and exits with status 2.

The parser (``loading``) and the value checks (``coerce``) are hand-written, about 300 lines: ``tyro`` and
``jsonargparse`` would each be a new dependency (neither is installed with the engine) for the same dotted keys.
"""

from engine.config.coerce import ConfigError, coerce
from engine.config.loading import (
    apply_mapping,
    exit_on_config_error,
    flat_keys,
    format_help,
    load_config,
    parse_cli,
    read_config_file,
    set_value,
    to_dict,
)
from engine.config.sections import DataConfig, LoRAConfig, ModelSection, TrainConfig

__all__ = [
    "ConfigError",
    "DataConfig",
    "LoRAConfig",
    "ModelSection",
    "TrainConfig",
    "apply_mapping",
    "coerce",
    "exit_on_config_error",
    "flat_keys",
    "format_help",
    "load_config",
    "parse_cli",
    "read_config_file",
    "set_value",
    "to_dict",
]
