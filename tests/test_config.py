"""Configuration: defaults -> YAML file -> KEY VALUE overrides -> validation -> a frozen CfgNode.

Every mistake a user can make is one ``ConfigError`` whose single-line message names the key and value.
"""

import re
from pathlib import Path

import pytest
from yacs.config import CfgNode

from ptengine import datasets
from ptengine.config import ConfigError, flatten_config, get_default_config, load_config
from ptengine.datasets import build_datasets
from ptengine.datasets.synthetic import build_synthetic

REPO_ROOT = Path(__file__).resolve().parent.parent
DIGITS_YAML = str(REPO_ROOT / "config" / "digits.yaml")

# Keys users port from the Lightning template: same names, same meanings.
TEMPLATE_KEYS = {
    "SEED", "TRAIN.BATCH_SIZE", "TRAIN.DISTRIBUTED_BACKEND", "TRAIN.GPUS", "TRAIN.LR", "TRAIN.MAX_EPOCHS",
    "TRAIN.MODEL_TYPE", "TRAIN.MOMENTUM", "TRAIN.OPTIMIZER_TYPE", "TRAIN.WEIGHT_DECAY", "TRAIN.SCHEDULER_TYPE",
    "TRAIN.STEP_SIZE", "TRAIN.GAMMA", "DATA.CACHE_DIR", "DATA.CLASSES", "DATA.DATASET_TYPE", "DATA.INPUT_DIM",
    "DATA.NUM_WORKERS", "DATA.TRANSFORM_LIST", "DATA.VALIDATION_SIZE", "MLFLOW.EXPERIMENT_NAME",
}


def config_error(*opts, config_file=None) -> str:
    """The message of the ConfigError that loading these overrides raises."""
    with pytest.raises(ConfigError) as raised:
        load_config(config_file, list(opts))
    message = str(raised.value)
    assert "\n" not in message
    return message


# ---- the keys --------------------------------------------------------------------------------------------

def test_the_lightning_template_keys_are_all_there():
    assert TEMPLATE_KEYS <= set(flatten_config(get_default_config()))


def test_every_key_in_defaults_has_a_comment():
    source = (REPO_ROOT / "config" / "defaults.py").read_text().splitlines()
    undocumented = []
    for number, line in enumerate(source):
        match = re.match(r"_C\.([A-Z_.]+) = (?!CN\(\))", line)
        if match and "#" not in line and not source[number - 1].lstrip().startswith("#"):
            undocumented.append(match.group(1))
    assert len([line for line in source if re.match(r"_C\.[A-Z_.]+ = (?!CN\(\))", line)]) >= 40
    assert undocumented == []


def test_every_key_the_code_reads_is_defined_in_defaults():
    known = set(flatten_config(get_default_config()))
    read = set()
    for folder in ("config", "datasets", "engine", "networks", "solvers", "tools"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            text = path.read_text()
            read |= set(re.findall(r"\bcfg\.([A-Z][A-Z0-9_]*(?:\.[A-Z][A-Z0-9_]*)*)\b", text))
            read |= {f"TRAIN.{key}" for key in re.findall(r"\btrain_cfg\.([A-Z][A-Z0-9_]*)\b", text)}
    leaves = {key for key in read if key in known or not any(k.startswith(key + ".") for k in known)}
    assert {"TRAIN.LR", "DATA.TRANSFORM_LIST", "CHECKPOINT.KEEP"} <= leaves
    assert leaves - known == set()


def test_every_key_can_be_set_from_the_command_line():
    defaults = get_default_config()
    for key, value in flatten_config(defaults).items():
        text = value if isinstance(value, str) else repr(value)
        assert load_config(None, [key, text]) == defaults, key


# ---- merging ---------------------------------------------------------------------------------------------

def test_command_line_overrides_the_file_which_overrides_the_defaults():
    cfg = load_config(DIGITS_YAML, ["TRAIN.LR", "0.05", "DATA.TRANSFORM_LIST", "['to_tensor']"])

    assert cfg.TRAIN.LR == 0.05  # command line
    assert cfg.TRAIN.BATCH_SIZE == 64 and cfg.DATA.DATASET_TYPE == "digits"  # digits.yaml
    assert cfg.TRAIN.MOMENTUM == 0.9 and cfg.SEED == 42  # defaults
    assert cfg.DATA.TRANSFORM_LIST == ["to_tensor"]


def test_the_result_is_frozen():
    cfg = load_config(None, [])
    with pytest.raises(AttributeError):
        cfg.TRAIN.LR = 1.0


def test_values_take_the_type_of_their_default():
    cfg = load_config(None, ["TRAIN.LR", "1", "OUTPUT_DIR", "007", "MLFLOW.RUN_NAME", "1e3",
                             "TRAIN.AMP", "True", "TRAIN.MILESTONES", "(3, 6)"])
    assert cfg.TRAIN.LR == 1.0 and isinstance(cfg.TRAIN.LR, float)
    assert cfg.OUTPUT_DIR == "007" and cfg.MLFLOW.RUN_NAME == "1e3"  # string keys keep the text as typed
    assert cfg.TRAIN.AMP is True
    assert cfg.TRAIN.MILESTONES == [3, 6]


def test_a_yaml_file_may_be_empty(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing to override\n")
    assert load_config(str(empty), []) == get_default_config()


def test_flattened_config_is_what_mlflow_params_are_made_of():
    flat = flatten_config(load_config(DIGITS_YAML, []))
    assert flat["TRAIN.LR"] == 0.02 and str(flat["TRAIN.LR"]) == "0.02"
    assert flat["DATA.CLASSES"] == [str(digit) for digit in range(10)]
    assert not any(isinstance(value, CfgNode) for value in flat.values())


def test_the_cifer10_spelling_is_accepted_as_cifar10(monkeypatch):
    seen = []

    def fake_cifar10(cfg):  # stands in for the real builder, which test_cifar10.py covers
        seen.append(cfg.DATA.DATASET_TYPE)
        return build_synthetic(cfg)

    monkeypatch.setitem(datasets.DATASET_REGISTRY, "cifar10", fake_cifar10)
    splits = build_datasets(load_config(None, ["DATA.DATASET_TYPE", "cifer10", "DATA.SYNTHETIC_SIZE", "20"]))
    assert seen == ["cifer10"]
    assert splits.num_classes == 10


def test_an_unknown_dataset_type_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown DATA.DATASET_TYPE 'mnist'; choose one of cifar10, digits"):
        build_datasets(load_config(None, ["DATA.DATASET_TYPE", "mnist"]))


def test_every_registry_refuses_an_unknown_name_with_one_error_type_and_the_sorted_choices():
    from ptengine.datasets import DATASET_REGISTRY
    from ptengine.datasets.transforms import TRANSFORM_REGISTRY
    from ptengine.networks import MODEL_REGISTRY
    from ptengine.solvers.lr_schedulers import SCHEDULE_REGISTRY
    from ptengine.solvers.optimizers import OPTIMIZER_REGISTRY

    for registry in (DATASET_REGISTRY, TRANSFORM_REGISTRY, MODEL_REGISTRY, SCHEDULE_REGISTRY, OPTIMIZER_REGISTRY):
        with pytest.raises(ConfigError) as raised:
            registry.lookup("no_such_name")
        assert str(raised.value) == (f"unknown {registry.key} 'no_such_name'; choose one of "
                                     f"{', '.join(sorted(registry))}")
    assert DATASET_REGISTRY.lookup("cifer10") is DATASET_REGISTRY["cifar10"]  # the template's spelling


# ---- user mistakes ---------------------------------------------------------------------------------------

def test_a_missing_config_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert f"config file not found: {missing}" in config_error(config_file=str(missing))


def test_a_folder_as_config_file_names_the_yaml_files_in_it():
    folder = REPO_ROOT / "config"
    message = config_error(config_file=str(folder))
    assert message.startswith(f"--config-file {folder} is a folder; pass one of its YAML files, e.g. ")
    assert f"{folder / 'digits.yaml'}, {folder / 'resnet18.yaml'}" in message


def test_a_folder_without_yaml_files_says_so(tmp_path):
    assert f"--config-file {tmp_path} is a folder with no YAML files in it" in config_error(config_file=str(tmp_path))


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("TRAIN:\n  LR: 0.1\n  BATCH_SIZE: [64\n")
    message = config_error(config_file=str(broken))
    assert message.startswith(f"malformed YAML in {broken}") and "line" in message


@pytest.mark.parametrize("text, expected", [
    ("TRAIN:\n  NO_SUCH_KEY: 1\n", "unknown config key TRAIN.NO_SUCH_KEY"),
    ("TRAIN:\n  BATCH_SZE: 32\n", "did you mean TRAIN.BATCH_SIZE?"),
    ("TRAIN:\n  lr: 0.1\n", "unknown config key TRAIN.lr; did you mean TRAIN.LR?"),
    ("train:\n  LR: 0.1\n", "unknown config key train; did you mean TRAIN?"),
    ("TRAIN: 3\n", "TRAIN is a section and needs nested keys"),
    ("- TRAIN\n", "must hold a mapping of config keys"),
    ("TRAIN:\n  LR: fast\n", "TRAIN.LR must be of type float"),
])
def test_mistakes_in_a_yaml_file_are_named(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert expected in config_error(config_file=str(path))


@pytest.mark.parametrize("opts, expected", [
    (["TRAIN.NO_SUCH_KEY", "1"], "unknown config key TRAIN.NO_SUCH_KEY"),
    (["TRAIN.LEARNING_RATE", "0.1"], "unknown config key TRAIN.LEARNING_RATE"),
    (["TRAN.LR", "0.1"], "did you mean TRAIN?"),
    (["train.lr", "0.1"], "unknown config key train.lr; did you mean TRAIN.LR?"),
    (["TRAIN.lr", "0.1"], "did you mean TRAIN.LR?"),
    (["Train.Lr", "0.1"], "did you mean TRAIN.LR?"),
    (["tran.lr", "0.1"], "did you mean TRAIN?"),
    (["TRAIN", "1"], "TRAIN is a section; set one of its keys"),
    (["TRAIN.LR"], "'TRAIN.LR' has no value"),
    (["TRAIN.BATCH_SIZE", "32.5"], "TRAIN.BATCH_SIZE must be of type int (like 128), got 32.5"),
    (["TRAIN.BATCH_SIZE", "True"], "TRAIN.BATCH_SIZE must be of type int"),
    (["TRAIN.LR", "fast"], "TRAIN.LR must be of type float (like 0.01), got 'fast'"),
    (["TRAIN.AMP", "1"], "TRAIN.AMP must be of type bool"),
    (["DATA.CLASSES", "cat"], "DATA.CLASSES must be of type list"),
])
def test_mistakes_on_the_command_line_are_named(opts, expected):
    assert expected in config_error(*opts)


@pytest.mark.parametrize("opts", [
    ["TRAIN.LR=0.1"],
    ["TRAIN.LR=0.1", "TRAIN.MAX_EPOCHS=3"],  # an even count pairs up, but wrongly
    ["SEED", "1", "TRAIN.LR=0.1", "TRAIN.MAX_EPOCHS", "3"],
    ["SEED", "1", "TRAIN.MAX_EPOCHS", "TRAIN.LR=0.1"],
])
def test_key_equals_value_on_the_command_line_shows_the_pair_to_write(opts):
    assert "'TRAIN.LR=0.1' is not a config override; write TRAIN.LR 0.1 (KEY VALUE, separated by a space)" \
        == config_error(*opts)


def test_a_value_may_contain_an_equals_sign():
    assert load_config(None, ["MLFLOW.RUN_NAME", "lr=0.1", "TRAIN.LR", "0.2"]).MLFLOW.RUN_NAME == "lr=0.1"
    assert "write TRAIN.LR 0.2" in config_error("MLFLOW.RUN_NAME", "lr=0.1", "TRAIN.LR=0.2")


@pytest.mark.parametrize("word, expected", [
    ("true", True), ("TRUE", True), ("yes", True), ("On", True),
    ("false", False), ("False", False), ("no", False), ("OFF", False),
])
def test_bool_keys_take_the_words_a_yaml_file_takes(word, expected, tmp_path):
    path = tmp_path / "amp.yaml"
    path.write_text(f"TRAIN:\n  AMP: {word}\n")
    assert load_config(str(path), []).TRAIN.AMP is expected  # what a YAML file means by the word...
    assert load_config(None, ["TRAIN.AMP", word]).TRAIN.AMP is expected  # ...it means on the command line


@pytest.mark.parametrize("key, value, expected", [
    ("TRAIN.BATCH_SIZE", "0", "TRAIN.BATCH_SIZE must be a positive integer, got 0"),
    ("TRAIN.MAX_EPOCHS", "-1", "TRAIN.MAX_EPOCHS must be a positive integer, got -1"),
    ("DATA.VALIDATION_SIZE", "0", "DATA.VALIDATION_SIZE must be strictly between 0 and 1, got 0.0"),
    ("DATA.VALIDATION_SIZE", "1", "DATA.VALIDATION_SIZE must be strictly between 0 and 1, got 1.0"),
    ("DATA.VALIDATION_SIZE", "1.5", "DATA.VALIDATION_SIZE must be strictly between 0 and 1, got 1.5"),
    ("DATA.VALIDATION_SIZE", "-0.2", "DATA.VALIDATION_SIZE must be strictly between 0 and 1, got -0.2"),
    ("TRAIN.LR", "0", "TRAIN.LR must be a positive number, got 0.0"),
    ("TRAIN.ACCUM_STEPS", "0", "TRAIN.ACCUM_STEPS must be a positive integer (1 = off), got 0"),
    ("TRAIN.GPUS", "-2", "TRAIN.GPUS must be -1 (all visible), 0 (CPU) or a positive count, got -2"),
    ("TRAIN.DISTRIBUTED_BACKEND", "horovod", "TRAIN.DISTRIBUTED_BACKEND must be one of dp, ddp, none, got 'horovod'"),
    ("TRAIN.MILESTONES", "[0, 3]", "TRAIN.MILESTONES must be a list of positive epoch numbers, got [0, 3]"),
    ("MLFLOW.END_WAIT", "-1", "MLFLOW.END_WAIT must be zero or a positive number of seconds, got -1.0"),
])
def test_values_out_of_range_are_refused(key, value, expected):
    assert config_error(key, value) == expected


def test_a_range_mistake_in_the_file_is_caught_too(tmp_path):
    path = tmp_path / "zero_batch.yaml"
    path.write_text("TRAIN:\n  BATCH_SIZE: 0\n")
    assert config_error(config_file=str(path)) == "TRAIN.BATCH_SIZE must be a positive integer, got 0"


def test_a_command_line_value_can_repair_a_bad_file_value(tmp_path):
    path = tmp_path / "zero_batch.yaml"
    path.write_text("TRAIN:\n  BATCH_SIZE: 0\n")
    assert load_config(str(path), ["TRAIN.BATCH_SIZE", "16"]).TRAIN.BATCH_SIZE == 16
