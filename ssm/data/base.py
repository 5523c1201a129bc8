"""What every input pipeline is to the training loop (see ssm.data.pipeline)."""

import dataclasses


class Pipeline:
  """What the loop reads: `kind` ("lm": token batches; "image": image batches),
  `batches(split, rows)`, `eval_variants()`; `bits_per_byte` where the loss is one."""
  kind = "lm"
  bits_per_byte = False

  @classmethod
  def from_config(cls, fields, batch_size, seed):
    fields = {k: v for k, v in fields.items() if k != "name"}
    return fields_of(cls, dict(fields, batch_size=batch_size, seed=seed),
                     f"task ({cls.__name__})")

  def batches(self, split, rows):
    raise NotImplementedError

  def eval_variants(self):
    """(suffix, pipeline) pairs evaluated besides the pipeline itself."""
    return []


def fields_of(cls, fields, where):
  """The dataclass `cls` from a config dict; unknown keys name the valid ones."""
  valid = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(fields) - valid)
  if unknown:
    raise ValueError(f"{where}: unknown keys {unknown}; valid keys: {sorted(valid)}")
  return cls(**fields)
