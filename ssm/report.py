"""Measured tables into docs/: the machine they were measured on, and a section of a
markdown file replaced in place (the benchmark scripts and the result reports)."""

import platform

import jax


def describe_device():
  device = jax.devices()[0]
  return (f"{device.platform} ({device.device_kind}, {platform.processor() or platform.machine()}, "
          f"{jax.local_device_count()} device(s))")


def write_section(path, name, body):
  """Replaces (or appends) the section between the markers of `name` in `path`."""
  begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
  text = path.read_text() if path.exists() else "# Benchmarks\n"
  block = f"{begin}\n{body}{end}"
  if begin in text:
    text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
  else:
    text = text.rstrip("\n") + "\n\n" + block + "\n"
  path.write_text(text)
