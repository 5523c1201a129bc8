"""AdamW with warmup + cosine (or constant) schedule, global-norm clipping and
weight decay where each parameter's role says (ssm.layers.partitioning: made with
it): not on norms, biases, A_log, D, LayerScale, nor (unless
train.decay_embeddings) on embeddings and class/register tokens."""

import jax
import optax

from ssm.layers.partitioning import roles


def decays(role, decay_embeddings=False):
  """Whether a parameter of weight-decay `role` (True, False, "embedding") decays."""
  return role is True or (role == "embedding" and decay_embeddings)


def schedule(cfg, steps=None):
  """cfg: the train config (lr, warmup_steps, steps, schedule, min_lr_ratio); `steps`:
  the schedule's length (default cfg.steps); past it the rate stays at its last value."""
  steps = steps or cfg.steps
  if cfg.schedule == "constant":
    main = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(cfg.lr, max(steps - cfg.warmup_steps, 1),
                                       alpha=cfg.min_lr_ratio)
  else:
    raise ValueError(f"train.schedule {cfg.schedule!r}: expected 'cosine' or 'constant'")
  if not cfg.warmup_steps:
    return main
  warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
  return optax.join_schedules([warmup, main], [cfg.warmup_steps])


def make_optimizer(cfg, model_state, steps=None):
  """(optax transformation, learning-rate schedule of `steps` steps) for the
  parameters of `model_state` (an nnx State, abstract or not)."""
  lr = schedule(cfg, steps)
  mask = jax.tree.map(lambda r: decays(r, cfg.decay_embeddings), roles(model_state)[1])
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
  parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=mask))
  return optax.chain(*parts), lr
