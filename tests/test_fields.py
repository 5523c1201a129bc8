"""ssm.fields: config sections into dataclasses, unknown keys named with the closest."""

import dataclasses

import pytest

from ssm.fields import check_keys, from_dict


@dataclasses.dataclass(frozen=True)
class Inner:
  d_state: int = 16


@dataclasses.dataclass(frozen=True)
class Outer:
  steps: int = 10
  inner: Inner = Inner()


def test_nested_dicts_become_dataclasses_over_a_base():
  assert from_dict(Outer, {"steps": 3, "inner": {"d_state": 8}}, "model") == Outer(3, Inner(8))
  base = Outer(5, Inner(4))
  assert from_dict(Outer, {"inner": {}}, "model", base) == base


def test_unknown_keys_name_the_closest_and_every_valid_key():
  with pytest.raises(ValueError, match=r"train: unknown keys \['stepz'\] \('stepz': did you "
                     r"mean 'steps'\?\); valid keys: \['inner', 'steps'\]"):
    check_keys({"stepz": 1}, ["steps", "inner"], "train")
  with pytest.raises(ValueError, match=r"model.inner: unknown keys \['d_stat'\]"):
    from_dict(Outer, {"inner": {"d_stat": 8}}, "model")
  check_keys({"steps": 1}, ["steps"], "train")  # nothing unknown: no error
