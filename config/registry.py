"""The registries' class lives in the engine (``engine/registry.py``), where a user's own file reaches it."""

from engine.registry import Registry

__all__ = ["Registry"]
