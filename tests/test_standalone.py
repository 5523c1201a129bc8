"""The repository stands alone: nothing in the library, the configs, the scripts or
the tests names a path outside it (a user's clone has no ../shared beside it, no one
else's home directory). Debian's dataset packages (/usr/share/datasets, installed by
the README's test command) are the one system location allowed."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("ssm", "configs", "scripts", "tests")
# a relative path that climbs out of its folder, or an absolute path on this machine
OUTSIDE = re.compile(r"(?<![.\w])\.\./|[\"'](/(?:work|home|mnt|tmp|root|srv|scratch|data|opt)\b"
                     r"[^\"']*)")
ALLOWED = ("/usr/share/datasets/",)


def files():
  for folder in FOLDERS:
    for path in sorted((ROOT / folder).rglob("*")):
      if path.is_file() and path.suffix in (".py", ".sh", ".md", ".toml", ".json", ".txt", ""):
        if "corpora" not in path.parts and "__pycache__" not in path.parts:
          yield path


def test_no_path_outside_the_repository():
  found = {}
  for path in files():
    if path == Path(__file__):
      continue  # this file's own examples
    text = path.read_text(errors="replace")
    bad = [m.group(0) for m in OUTSIDE.finditer(text)
           if not any(a in text[m.start():m.start() + 40] for a in ALLOWED)]
    if bad:
      found[str(path.relative_to(ROOT))] = bad
  assert not found, f"paths outside the repository: {found}"
  assert sum(1 for _ in files()) > 50  # it read the tree


def test_the_check_catches_such_paths():
  for bad in ["open('../shared/data/x')", 'p = "/work/main/runs"', "DIR='/home/me/data'"]:
    assert OUTSIDE.search(bad), bad
  for fine in ["x = '.../data/metadata'", "'runs/x'", "'/usr/share/datasets/fashion-mnist'"]:
    assert not OUTSIDE.search(fine), fine
