"""The resumable pipeline behind ``actsel run``: config, stage caches, stages and the report."""

from actsel.pipeline.config import ConfigError, RunConfig, config_from_dict, read_config_file
from actsel.pipeline.stages import Run

__all__ = ["ConfigError", "Run", "RunConfig", "config_from_dict", "read_config_file"]
