"""ssm-train --config configs/<task>.py:<arch> --workdir DIR [--config.key=value ...]"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from ssm.train.loop import NonFiniteLoss, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<task>.py:<arch>",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and metrics go")


def _main(argv):
  del argv
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every step at INFO
  logging.getLogger("ssm").setLevel(logging.INFO)
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
