"""Named builders, one registry per config key (models, datasets, optimizers, schedules, transforms).

``Registry.lookup(name)`` is the one place an unknown name becomes an error: a ``ConfigError`` naming the key,
the bad value and the sorted choices, e.g. ``unknown TRAIN.MODEL_TYPE 'vgg16'; choose one of resnet18, simple_cnn``.
"""

from ptengine.config.setup import ConfigError


class Registry(dict):
    """``{name: builder}`` for the config key ``key``; ``aliases`` map other spellings to names."""

    def __init__(self, key: str, builders: dict, aliases: dict | None = None):
        super().__init__(builders)
        self.key, self.aliases = key, dict(aliases or {})

    def lookup(self, name: str):
        """The builder registered as ``name`` (or an alias of it)."""
        name = self.aliases.get(name, name)
        if name not in self:
            raise ConfigError(f"unknown {self.key} '{name}'; choose one of {', '.join(sorted(self))}")
        return self[name]
