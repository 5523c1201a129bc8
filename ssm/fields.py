"""Plain dicts (config sections) into dataclasses, with unknown keys named: the one
check that every config section goes through (models, tasks, pipelines, comparisons)."""

import dataclasses
import difflib
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
  return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
