"""Configuration: every key lives in ``defaults.py``; ``setup.py`` merges, validates and freezes."""

from ptengine.config.defaults import get_default_config
from ptengine.config.setup import ConfigError, flatten_config, load_config, setup_config

__all__ = ["ConfigError", "flatten_config", "get_default_config", "load_config", "setup_config"]
