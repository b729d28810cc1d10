"""Checks of configuration values: a setting that cannot work stops a run before anything is built,
with a message that names it (`train.group_size must be at least 1, got 0`), instead of failing
deep inside the first step with a message about something else.

No project imports: the config dataclasses of every module check their fields with these.
"""

from __future__ import annotations

import math


class SettingError(ValueError):
    """A config value that cannot work; the message names the setting as it is overridden."""


def check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise SettingError(f"{name} must be at least {minimum}, got {value}")


def check_number(name: str, value, *, minimum: float | None = None, maximum: float | None = None,
                 positive: bool = False) -> None:
    """A finite number within [minimum, maximum]; `positive`: strictly above 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SettingError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise SettingError(f"{name} must be positive, got {value}")
    if minimum is not None and value < minimum:
        raise SettingError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise SettingError(f"{name} must be at most {maximum}, got {value}")
