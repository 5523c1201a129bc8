"""AdamW with warmup + cosine (or constant) schedule, global-norm clipping and
weight decay masked off what should not decay."""

import re

import jax
import optax

# Parameters that never decay: norms, biases, the SSM's A_log, D (and their Vim
# twins), LayerScale, and (unless asked) embeddings, class/register tokens.
NO_DECAY = re.compile(r"(^|/)(norm\w*|layer_scale\d)/|(^|/)(bias|A_log|A_b_log|D|D_b|"
                      r"conv_bias|conv_bias_b|layer_scale\d)$")
EMBEDDINGS = re.compile(r"(^|/)(embedding|position_embedding|cls_token|register_tokens)(/|$)")


def path_str(path):
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def decays(path, decay_embeddings=False):
  name = path if isinstance(path, str) else path_str(path)
  if NO_DECAY.search(name):
    return False
  return decay_embeddings or not EMBEDDINGS.search(name)


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


def make_optimizer(cfg, params, steps=None):
  """Returns (optax transformation, learning-rate schedule of `steps` steps)."""
  lr = schedule(cfg, steps)
  mask = jax.tree_util.tree_map_with_path(lambda p, _: decays(p, cfg.decay_embeddings), params)
  parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
  parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=mask))
  return optax.chain(*parts), lr
