"""What every input pipeline is to the training loop (see ssm.data.pipeline)."""

from ssm.fields import from_dict

# The fields of a task that are not in config.task: the loop fills them in.
LOOP_FIELDS = frozenset({"name", "batch_size", "seed"})


class Pipeline:
  """What the loop reads: `kind` ("lm": token batches; "image": image batches),
  `batches(split, rows)`, `eval_variants()`; `bits_per_byte` where the loss is one."""
  kind = "lm"
  bits_per_byte = False

  @classmethod
  def from_config(cls, fields, batch_size, seed):
    fields = {k: v for k, v in fields.items() if k != "name"}
    return from_dict(cls, dict(fields, batch_size=batch_size, seed=seed),
                     f"task ({cls.__name__})")

  def batches(self, split, rows):
    raise NotImplementedError

  def eval_variants(self):
    """(suffix, pipeline) pairs evaluated besides the pipeline itself."""
    return []
