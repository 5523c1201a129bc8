"""Plain dicts (config sections) into dataclasses, with unknown keys named: the one
check that every config section goes through (models, tasks, pipelines, comparisons)."""

import dataclasses
import difflib
import typing
from collections.abc import Mapping


def check_keys(given, valid, where):
  """A ValueError naming the keys of `given` not in `valid`, the closest valid ones
  and all of them."""
  unknown = sorted(set(given) - set(valid))
  if not unknown:
    return
  close = {k: difflib.get_close_matches(k, list(valid), n=2) for k in unknown}
  hints = "; ".join(f"{k!r}: did you mean {' or '.join(map(repr, c))}?"
                    for k, c in close.items() if c)
  raise ValueError(f"{where}: unknown keys {unknown}" + (f" ({hints})" if hints else "")
                   + f"; valid keys: {sorted(valid)}")


def from_dict(cls, fields, where, base=None):
  """`cls(**fields)`, or `dataclasses.replace(base, **fields)` where a `base` instance
  gives the defaults; a dict for a dataclass-valued field becomes that dataclass the
  same way. `where` names the section in errors ("model", "task")."""
  valid = {f.name: f for f in dataclasses.fields(cls)}
  check_keys(fields, valid, where)
  kwargs = {}
  for name, value in fields.items():
    default = getattr(base, name) if base is not None else valid[name].default
    if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
      value = from_dict(type(default), value, f"{where}.{name}", default)
    kwargs[name] = value
  check_types(cls, kwargs, where)
  return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def check_types(cls, values, where):
  """Each value for a field of dataclass `cls` annotated int, float, bool or str (or one
  of them or None) is such a value: a ValueError naming the key, the value and the type."""
  hints = typing.get_type_hints(cls)
  for name, value in values.items():
    hint = hints[name]
    allowed = [t for t in (typing.get_args(hint) or (hint,)) if t in (int, float, bool, str)]
    if not allowed:
      continue
    if value is None and type(None) in typing.get_args(hint):
      continue
    ok = any(isinstance(value, t) and not (t is int and isinstance(value, bool))
             or (t is float and isinstance(value, int) and not isinstance(value, bool))
             for t in allowed)
    if not ok:
      names = " or ".join(t.__name__ for t in allowed)
      raise ValueError(f"{where}.{name}={value!r}: expected {names}")


def require(where, **checks):
  """ValueErrors for the checks that fail: `require("model", d_model=(d, d > 0))`, each
  key naming its value and the condition's text."""
  for name, (value, ok, *what) in checks.items():
    if not ok:
      raise ValueError(f"{where}.{name}={value!r}: {what[0] if what else 'must be positive'}")
