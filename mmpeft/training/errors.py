"""The error a setting that cannot work raises, in a module of its own so that every module of `mmpeft.training`
can raise it without importing the arguments (which import several of them)."""


class ConfigError(ValueError):
    """A setting that cannot work, named with its value and the fix (the recipes print it as one line)."""


__all__ = ["ConfigError"]
