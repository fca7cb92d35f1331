"""Build the run's configuration: defaults -> YAML file -> command-line KEY VALUE pairs -> validate -> freeze.

Every mistake a user can make here is raised as one ``ConfigError`` whose message names the bad key or
value and the fix; ``tools/train_net.py`` prints it as a single line.
"""

import ast
import difflib
import re
from pathlib import Path

import yaml
from yacs.config import CfgNode

from ptengine.config.defaults import get_default_config

# What YAML 1.1 (yaml.safe_load) reads as a bool, so the command line takes what a config file takes.
BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
KEY_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
FOLDER_EXAMPLES = 6  # YAML files named when --config-file is a folder


class ConfigError(ValueError):
    """A user mistake in the configuration or command line (printed as one line, no traceback)."""


def load_config(config_file: str | None = None, opts: list[str] | None = None) -> CfgNode:
    """Return the frozen, validated configuration for a run."""
    cfg = get_default_config()
    if config_file:
        merge_yaml_file(cfg, config_file)
    if opts:
        merge_opts(cfg, opts)
    validate_config(cfg)
    cfg.freeze()
    return cfg


def setup_config(args) -> CfgNode:
    """``load_config`` from parsed command-line arguments (``config_file`` and ``opts``)."""
    return load_config(args.config_file, list(args.opts or []))


def merge_yaml_file(cfg: CfgNode, path: str) -> None:
    file = Path(path)
    if file.is_dir():
        raise ConfigError(_folder_message(file, path))
    if not file.is_file():
        raise ConfigError(f"config file not found: {path} (pass an existing YAML file, e.g. config/digits.yaml)")
    try:
        data = yaml.safe_load(file.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file; --config-file takes a YAML file such as config/digits.yaml")\
            from None
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"malformed YAML in {path}{line}: {getattr(error, 'problem', error)}") from None
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    _merge_mapping(cfg, data, prefix="", source=path)


def merge_opts(cfg: CfgNode, opts: list[str]) -> None:
    _check_no_key_equals_value(cfg, opts)
    if len(opts) % 2:
        raise ConfigError(f"command-line overrides come in KEY VALUE pairs; '{opts[-1]}' has no value")
    for key, text in zip(opts[0::2], opts[1::2], strict=True):
        node, leaf = _find_parent(cfg, key)
        if isinstance(node[leaf], str):
            value = text  # taken as typed, so OUTPUT_DIR 007 stays "007"
        elif isinstance(node[leaf], bool) and text.lower() in BOOL_WORDS:
            value = BOOL_WORDS[text.lower()]
        else:
            value = _parse_literal(text)
        node[leaf] = _coerce(key, node[leaf], value)


def validate_config(cfg: CfgNode) -> None:
    """Range checks the types alone cannot express."""
    checks = [
        ("TRAIN.BATCH_SIZE", cfg.TRAIN.BATCH_SIZE >= 1, "a positive integer"),
        ("TRAIN.MAX_EPOCHS", cfg.TRAIN.MAX_EPOCHS >= 1, "a positive integer"),
        ("TRAIN.LR", cfg.TRAIN.LR > 0, "a positive number"),
        ("TRAIN.MOMENTUM", 0 <= cfg.TRAIN.MOMENTUM < 1, "in [0, 1)"),
        ("TRAIN.WEIGHT_DECAY", cfg.TRAIN.WEIGHT_DECAY >= 0, "zero or positive"),
        ("TRAIN.STEP_SIZE", cfg.TRAIN.STEP_SIZE >= 1, "a positive number of epochs"),
        ("TRAIN.GAMMA", cfg.TRAIN.GAMMA > 0, "a positive number"),
        ("TRAIN.MILESTONES", all(type(m) is int and m >= 1 for m in cfg.TRAIN.MILESTONES),
         "a list of positive epoch numbers"),
        ("TRAIN.WARMUP_EPOCHS", cfg.TRAIN.WARMUP_EPOCHS >= 0, "zero (off) or positive"),
        ("TRAIN.CLIP_GRAD_NORM", cfg.TRAIN.CLIP_GRAD_NORM >= 0, "zero (off) or positive"),
        ("TRAIN.ACCUM_STEPS", cfg.TRAIN.ACCUM_STEPS >= 1, "a positive integer (1 = off)"),
        ("TRAIN.AMP_DTYPE", cfg.TRAIN.AMP_DTYPE in ("float16", "bfloat16"), "float16 or bfloat16"),
        ("TRAIN.EMA_DECAY", 0 <= cfg.TRAIN.EMA_DECAY < 1, "in [0, 1) (0 = off), e.g. 0.999"),
        ("TRAIN.LABEL_SMOOTHING", 0 <= cfg.TRAIN.LABEL_SMOOTHING < 1, "in [0, 1) (0 = off), e.g. 0.1"),
        ("TRAIN.MIXUP_ALPHA", cfg.TRAIN.MIXUP_ALPHA >= 0, "zero (off) or positive, e.g. 0.2"),
        ("TRAIN.CUTMIX_ALPHA", cfg.TRAIN.CUTMIX_ALPHA >= 0, "zero (off) or positive, e.g. 1.0"),
        ("TRAIN.GPUS", cfg.TRAIN.GPUS >= -1, "-1 (all visible), 0 (CPU) or a positive count"),
        ("TRAIN.DISTRIBUTED_BACKEND", cfg.TRAIN.DISTRIBUTED_BACKEND in ("dp", "ddp", "none"),
         "one of dp, ddp, none"),
        ("DATA.VALIDATION_SIZE", 0 < cfg.DATA.VALIDATION_SIZE < 1, "strictly between 0 and 1"),
        ("DATA.INPUT_DIM", cfg.DATA.INPUT_DIM >= 1, "a positive number of channels"),
        ("DATA.CLASSES", len(cfg.DATA.CLASSES) >= 2, "a list of at least two class names"),
        ("DATA.NUM_WORKERS", cfg.DATA.NUM_WORKERS >= 0, "zero or positive"),
        ("DATA.IMAGE_SIZE", cfg.DATA.IMAGE_SIZE >= 8, "at least 8 pixels"),
        ("DATA.SYNTHETIC_SIZE", cfg.DATA.SYNTHETIC_SIZE >= 2, "at least 2 images"),
        ("LOG.PERIOD", cfg.LOG.PERIOD >= 1, "a positive number of iterations"),
        ("EVAL.PERIOD", cfg.EVAL.PERIOD >= 0, "zero (end only) or a positive number of epochs"),
        ("EVAL.SPLIT", cfg.EVAL.SPLIT in ("val", "test"), "val or test"),
        ("CHECKPOINT.PERIOD", cfg.CHECKPOINT.PERIOD >= 0, "zero (epoch ends only) or positive"),
        ("CHECKPOINT.KEEP", cfg.CHECKPOINT.KEEP >= 1, "a positive integer"),
        ("MLFLOW.END_WAIT", cfg.MLFLOW.END_WAIT >= 0, "zero or a positive number of seconds"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{key} must be {expected}, got {_lookup(cfg, key)!r}")


def with_output_dir(cfg: CfgNode, output_dir) -> CfgNode:
    """A frozen copy of ``cfg`` with OUTPUT_DIR resolved, so config.yaml, the params and the tags name the real
    folder."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.freeze()
    return cfg


def flatten_config(cfg: CfgNode, prefix: str = "") -> dict[str, object]:
    """``{"TRAIN.LR": 0.01, ...}``: the form logged as MLflow params."""
    flat = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, CfgNode):
            flat.update(flatten_config(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def _folder_message(folder: Path, path: str) -> str:
    names = sorted(str(Path(path) / file.name) for pattern in ("*.yaml", "*.yml") for file in folder.glob(pattern))
    if not names:
        return f"--config-file {path} is a folder with no YAML files in it; pass a YAML file such as config/digits.yaml"
    return f"--config-file {path} is a folder; pass one of its YAML files, e.g. {', '.join(names[:FOLDER_EXAMPLES])}"


def _check_no_key_equals_value(cfg: CfgNode, opts: list[str]) -> None:
    """Refuse ``TRAIN.LR=0.1``: split as a KEY VALUE pair it would pair the wrong tokens or have no value.

    Every token in a key position is checked; a value is refused only when its left part is a config key, so
    a value such as ``MLFLOW.RUN_NAME lr=0.1`` stays allowed.
    """
    known = {key.upper() for key in flatten_config(cfg)}
    for index, token in enumerate(opts):
        key, equals, value = token.partition("=")
        if equals and KEY_PATTERN.fullmatch(key) and (index % 2 == 0 or key.upper() in known):
            raise ConfigError(f"'{token}' is not a config override; write {key} {value} "
                              "(KEY VALUE, separated by a space)")


def _merge_mapping(cfg: CfgNode, data: dict, prefix: str, source: str) -> None:
    for key, value in data.items():
        full_key = f"{prefix}{key}"
        if key not in cfg:
            raise ConfigError(_unknown_key_message(cfg, full_key, key, prefix) + f" (in {source})")
        if isinstance(cfg[key], CfgNode):
            if not isinstance(value, dict):
                raise ConfigError(f"{full_key} is a section and needs nested keys, got {value!r} (in {source})")
            _merge_mapping(cfg[key], value, prefix=f"{full_key}.", source=source)
        else:
            cfg[key] = _coerce(full_key, cfg[key], value)


def _find_parent(cfg: CfgNode, full_key: str) -> tuple[CfgNode, str]:
    node, prefix = cfg, ""
    *parents, leaf = full_key.split(".")
    for part in parents:
        if part not in node or not isinstance(node[part], CfgNode):
            raise ConfigError(_unknown_key_message(node, full_key, part, prefix))
        node, prefix = node[part], f"{prefix}{part}."
    if leaf not in node:
        raise ConfigError(_unknown_key_message(node, full_key, leaf, prefix))
    if isinstance(node[leaf], CfgNode):
        raise ConfigError(f"{full_key} is a section; set one of its keys, e.g. {full_key}.{next(iter(node[leaf]))}")
    return node, leaf


def _unknown_key_message(node: CfgNode, full_key: str, part: str, prefix: str) -> str:
    """Suggest the key spelled in another case (``train.lr`` -> ``TRAIN.LR``), else the closest spelling."""
    rest = full_key[len(prefix) + len(part):].lstrip(".")
    suggestion = _match_ignoring_case(node, [part, *rest.split(".")] if rest else [part])
    if suggestion is None:
        by_upper = {key.upper(): key for key in node.keys()}
        close = difflib.get_close_matches(part.upper(), list(by_upper), n=1)
        suggestion = by_upper[close[0]] if close else None
    hint = f"; did you mean {prefix}{suggestion}?" if suggestion else "; every key is listed in config/defaults.py"
    return f"unknown config key {full_key}{hint}"


def _match_ignoring_case(node: CfgNode, parts: list[str]) -> str | None:
    """The key path that ``parts`` names when case is ignored, or None."""
    matched = []
    for part in parts:
        if not isinstance(node, CfgNode):
            return None
        key = next((key for key in node.keys() if key.upper() == part.upper()), None)
        if key is None:
            return None
        matched.append(key)
        node = node[key]
    return ".".join(matched)


def _parse_literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as sgd or a path


def _coerce(key: str, default, value):
    """Return ``value`` converted to the type of the default, or raise a ConfigError naming both."""
    if isinstance(default, bool) or isinstance(value, bool):
        if type(default) is type(value):
            return value
    elif isinstance(default, float) and isinstance(value, (int, float)):
        return float(value)
    elif isinstance(default, int) and isinstance(value, int):
        return value
    elif isinstance(default, str) and isinstance(value, (str, int, float)):
        return str(value)
    elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return list(value)
    expected = type(default).__name__
    raise ConfigError(f"{key} must be of type {expected} (like {default!r}), got {value!r} ({type(value).__name__})")


def _lookup(cfg: CfgNode, full_key: str):
    node = cfg
    for part in full_key.split("."):
        node = node[part]
    return node
