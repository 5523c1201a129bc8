import importlib
import os

import pytest


def require(module):
  """Imports an optional test dependency; in CI a missing one fails instead of skipping."""
  if os.environ.get("CI"):
    return importlib.import_module(module)
  return pytest.importorskip(module)
