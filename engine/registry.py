"""Named builders, one registry per config key: models, datasets, transforms, optimizers, LR schedules.

The engine only holds the registries; the builders fill them (``networks``, ``datasets``, ``solvers``), and so
can a file of yours, without editing this repository::

    from engine import MODEL_REGISTRY

    @MODEL_REGISTRY.register("mynet")
    def build_mynet(cfg):                      # called with the frozen config
        return MyNet(num_classes=len(cfg.DATA.CLASSES))

Then ``TRAIN.MODEL_TYPE mynet`` works from Python, and from the command line once the file is imported:
``tools/train_net.py --import my_models.py ...`` (or the config key ``IMPORTS``).

``Registry.lookup(name)`` is the one place an unknown name becomes an error: a ``ConfigError`` naming the key,
the bad value and the sorted choices, e.g. ``unknown TRAIN.MODEL_TYPE 'vgg16'; choose one of resnet18, simple_cnn``.
"""

from ptengine.config.setup import ConfigError


class Registry(dict):
    """``{name: builder}`` for the config key ``key``; ``aliases`` map other spellings to names."""

    def __init__(self, key: str, builders: dict | None = None, aliases: dict | None = None):
        super().__init__(builders or {})
        self.key, self.aliases = key, dict(aliases or {})

    def register(self, name: str | None = None):
        """Decorator: ``@REGISTRY.register("name")`` (default: the function's or class's own name).

        Registering another object under a taken name is an error; the same definition again (a notebook
        cell run twice, a module imported under two names) replaces the first.
        """
        def add(builder):
            key = name or builder.__name__
            taken = self.get(key)
            if taken is not None and _qualified_name(taken) != _qualified_name(builder):
                raise ValueError(f"{self.key} '{key}' is already registered to {_qualified_name(taken)}; "
                                 f"register {_qualified_name(builder)} under another name")
            self[key] = builder
            return builder

        return add

    def lookup(self, name: str):
        """The builder registered as ``name`` (or an alias of it)."""
        name = self.aliases.get(name, name)
        if name not in self:
            raise ConfigError(f"unknown {self.key} '{name}'; choose one of {', '.join(sorted(self))}")
        return self[name]


def _qualified_name(builder) -> str:
    module = getattr(builder, "__module__", "") or ""
    return f"{module.rsplit('.', 1)[-1]}.{getattr(builder, '__qualname__', repr(builder))}"


# Filled by the builders' packages when they are imported (tools/build.py imports them all).
MODEL_REGISTRY = Registry("TRAIN.MODEL_TYPE")  # cfg -> nn.Module
DATASET_REGISTRY = Registry("DATA.DATASET_TYPE")  # cfg -> datasets.DatasetSplits
TRANSFORM_REGISTRY = Registry("DATA.TRANSFORM_LIST")  # (mean, std, seed) -> a batch transform step
OPTIMIZER_REGISTRY = Registry("TRAIN.OPTIMIZER_TYPE")  # (params, cfg.TRAIN) -> torch.optim.Optimizer
SCHEDULE_REGISTRY = Registry("TRAIN.SCHEDULER_TYPE")  # (cfg.TRAIN, iters_per_epoch, max_iters) -> lr factor fn
