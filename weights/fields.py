"""The one typed reader of config.json fields that every family's config parses with.

A field is required (no default) or optional (a default, possibly None); an explicit JSON `null`
is the same as an absent field, as in the released configs and their reference code (LLaDA-MoE's
`shared_expert_intermediate_size: null` means no shared expert). Values are type-checked (a bool
is not an integer) and range-checked, and every error names the field (`ConfigError`).
"""

from __future__ import annotations

import math


class ConfigError(ValueError):
    """A config.json that this server cannot run; the message names the field."""


REQUIRED = object()  # default of a field that must be present (and not null)


class Fields:
    """Typed access to a parsed config.json (a dict)."""

    def __init__(self, raw: dict):
        self.raw = raw

    def value(self, name: str, default=None):
        """The raw value, `default` when the field is absent or null."""
        v = self.raw.get(name)
        return default if v is None else v

    def _present(self, name: str, default):
        v = self.raw.get(name)
        if v is None and default is REQUIRED:
            raise ConfigError(f"config.json: missing required field {name!r}")
        return v

    def int(self, name: str, default=REQUIRED, low: int | None = 1):
        """An integer >= `low` (None: no bound); `default` (may be None) when absent or null."""
        v = self._present(name, default)
        if v is None:
            return default
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"config.json: field {name!r} must be an integer, got {v!r}")
        if low is not None and v < low:
            raise ConfigError(f"config.json: field {name!r} must be >= {low}, got {v}")
        return v

    def float(self, name: str, default=REQUIRED, high: float | None = None):
        """A positive number (at most `high` when given) as a float; `default` when absent or null."""
        v = self._present(name, default)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"config.json: field {name!r} must be a number, got {v!r}")
        if not v > 0 or math.isinf(v):
            raise ConfigError(f"config.json: field {name!r} must be positive and finite, got {v}")
        if high is not None and v > high:
            raise ConfigError(f"config.json: field {name!r} must be <= {high}, got {v}")
        return float(v)

    def bool(self, name: str, default: bool) -> bool:
        v = self.raw.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise ConfigError(f"config.json: field {name!r} must be true or false, got {v!r}")
        return v

    def int_list(self, name: str, length: int, meaning: str) -> tuple[int, ...]:
        """A list of exactly `length` integers (required)."""
        v = self.raw.get(name)
        if not isinstance(v, list) or len(v) != length or \
                not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise ConfigError(f"config.json: {name} must be a list of {length} integers ({meaning}), "
                              f"got {v!r}")
        return tuple(v)

    def one_of(self, name: str, allowed: tuple, why: str) -> None:
        """Refuse a present, non-null value outside `allowed`."""
        v = self.raw.get(name)
        if v is not None and v not in allowed:
            raise ConfigError(f"config.json: unsupported {name}={v!r}; {why}")

    def off(self, name: str) -> None:
        """Refuse a truthy value (a feature this network does not have)."""
        v = self.raw.get(name)
        if v:
            raise ConfigError(f"config.json: unsupported {name}={v!r}; it must be off")


def check_special_ids(cfg, rows: int, table: str) -> None:
    """The config's mask / EOS / pad ids (those it has) index a table of `rows` rows; `table` names it
    in the message (e.g. "vocabulary (vocab_size=300)")."""
    for name in ("mask_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(cfg, name)
        if v is not None and v >= rows:
            raise ConfigError(f"config.json: {name}={v} is outside the {table}")
