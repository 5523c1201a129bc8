"""The shared training loop: `ssm.train.train(config, workdir)` and `ssm-train`."""

from ssm.train.loop import NonFiniteLoss, Trainer, train

__all__ = ["NonFiniteLoss", "Trainer", "train"]
