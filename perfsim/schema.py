"""Validation of YAML/JSON data into plain values, with errors that name the file, the field and what
was expected. Used once at load; everything after works on frozen dataclasses."""

from __future__ import annotations

from pathlib import Path

import yaml

from perfsim.errors import UserError


class Fields:
    """Reads the fields of one mapping, checking each; `done()` rejects the keys nobody asked for."""

    def __init__(self, data, where: str, path: str = ""):
        self.where = where  # the file (or other origin) the data came from
        self.path = path  # dotted path of this mapping inside the file, "" at the top
        if not isinstance(data, dict):
            self.fail("", f"expected a mapping, got {_type_name(data)}")
        self.data = data
        self.seen: set[str] = set()

    def field_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str, expected: str):
        field = self.field_path(key) if key else (self.path or "top level")
        raise UserError(f"{self.where}: {field}: {expected}")

    def _get(self, key: str, default, required: bool):
        self.seen.add(key)
        if key not in self.data or self.data[key] is None:
            if required:
                self.fail(key, "missing (required field)")
            return default
        return self.data[key]

    def number(self, key: str, *, minimum=None, exclusive_minimum=None, maximum=None, required=True, default=None, integer=False) -> float:
        if self.data.get(key) is None:
            return self._get(key, default, required)
        value = self._get(key, default, required)
        kind = "a whole number" if integer else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            self.fail(key, f"expected {kind}, got {_type_name(value)} {value!r}")
        if exclusive_minimum is not None and not value > exclusive_minimum:
            self.fail(key, f"expected {kind} > {exclusive_minimum}, got {value}")
        if minimum is not None and value < minimum:
            self.fail(key, f"expected {kind} >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            self.fail(key, f"expected {kind} <= {maximum}, got {value}")
        return value

    def integer(self, key: str, **bounds) -> int:
        return self.number(key, integer=True, **bounds)

    def text(self, key: str, *, choices=None, required=True, default=None) -> str:
        if self.data.get(key) is None:
            return self._get(key, default, required)
        value = self._get(key, default, required)
        if not isinstance(value, str) or not value.strip():
            self.fail(key, f"expected a non-empty string, got {_type_name(value)} {value!r}")
        if choices is not None and value not in choices:
            self.fail(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def boolean(self, key: str, *, required=True, default=None) -> bool:
        value = self._get(key, default, required)
        if self.data.get(key) is not None and not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {_type_name(value)} {value!r}")
        return value

    def mapping(self, key: str, *, required=True) -> "Fields | None":
        value = self._get(key, None, required)
        return None if value is None else Fields(value, self.where, self.field_path(key))

    def items(self, key: str, *, required=True) -> list:
        value = self._get(key, [], required)
        if not isinstance(value, list):
            self.fail(key, f"expected a list, got {_type_name(value)}")
        return value

    def done(self):
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            known = ", ".join(sorted(self.seen))
            self.fail(str(unknown[0]), f"unknown key; expected one of: {known}")


# libyaml's safe loader when PyYAML was built with it: ~10x faster than the pure-Python one (a profile
# loads in ~2 ms instead of ~25), and just as safe (no tags that build Python objects).
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_SAFE_LOADER)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}: not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read: {e}") from None


def _type_name(value) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "nothing"}.get(
        type(value), type(value).__name__
    )
