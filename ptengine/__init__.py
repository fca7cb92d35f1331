"""The project under one installed name, so that nothing of it shadows another package.

The repository keeps its folders at the top (``config/``, ``datasets/``, ``networks/``, ``solvers/``, ``tools/``),
and three of those names are common: Hugging Face's ``datasets`` is installed beside many PyTorch projects.
Installed with ``pip install -e .``, only two names are taken: ``engine`` (the engine itself) and ``ptengine``,
through which the other folders are imported (``ptengine.datasets`` is the ``datasets/`` folder). The project's
own code imports them this way too, so it works wherever it runs, whatever else is installed.

    import ptengine
    cfg = ptengine.load_config("config/digits.yaml", ["TRAIN.MAX_EPOCHS", "3"])
    result = ptengine.Runner(cfg, model=MyNet()).train()
"""

from pathlib import Path

# The repository's root: ptengine.<folder> is <root>/<folder>.
__path__.append(str(Path(__file__).resolve().parent.parent))  # noqa: F821 (a package's own __path__)


def load_config(config_file: str | None = None, opts: list[str] | None = None):
    """The frozen config: defaults <- ``config_file`` (a YAML file) <- ``opts`` (``["TRAIN.LR", "0.05"]``)."""
    from ptengine.config import load_config as load

    return load(config_file, opts)


def Runner(cfg, **objects):  # noqa: N802 (it makes an engine.Runner)
    """``engine.Runner`` with the project's builders (``ptengine.tools.build``): what you do not hand over
    (``model``, ``train_data``, ``val_data``, ``optimizer``, ``loss``, ``hooks``) comes from ``cfg``."""
    from engine.runner import Runner as EngineRunner
    from ptengine.tools import build

    return EngineRunner(cfg, build, **objects)
