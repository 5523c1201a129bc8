"""ssm-train --config configs/<task>.py:<arch> --workdir DIR [--config.key=value ...]"""

import sys

from absl import app, flags
from ml_collections import config_flags

from ssm.train.loop import NonFiniteLoss, train
from ssm.train.metrics import setup_logging

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<task>.py:<arch>",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and metrics go")


def _main(argv):
  del argv
  setup_logging()
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except NonFiniteLoss as e:
    print(f"ssm-train: {e}", file=sys.stderr)
    sys.exit(3)


def main():
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(_main)


if __name__ == "__main__":
  main()
