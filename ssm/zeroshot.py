"""Zero-shot evaluation as the field runs it: any ssm language model (a workdir, or a
Hugging Face import) as an EleutherAI lm-evaluation-harness model (`SSMLM`), and
`run_tasks`, which `ssm-eval --tasks` calls. Mamba's Table 3:

  ssm-eval --hf state-spaces/mamba-130m-hf --tokenizer EleutherAI/gpt-neox-20b \\
      --tasks lambada_openai,hellaswag,piqa,arc_easy,arc_challenge,winogrande

(the paper reports accuracy, and acc_norm for HellaSwag and ARC-challenge). Offline,
tasks are YAML files with local jsonl data (`--include-path DIR`, see
tests/test_zeroshot.py). Needs `pip install 'ssm-jax[lm]'`.

Scoring: a request's text is tokenized whole and split at the context's tokens, as
lm-eval's Hugging Face model does; every sequence starts with the tokenizer's BOS (a
document start, as in training). Sequences are right-padded into batches of a few
padded lengths (powers of two) so that few shapes compile; a causal model never sees
the padding. `generate_until` runs ssm.generate's compiled prefill and decode loop.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssm.generate.decode import generate
from ssm.generate.sampling import Sampling

try:
  from lm_eval.api.model import LM
except ImportError:  # the [lm] extra: run_tasks says what to install
  LM = object


@functools.partial(jax.jit, static_argnums=0)
def _score(graphdef, params, ids_BL, targets_BL, mask_BL):
  """Per row: the sum of log p(target) over the masked positions, and whether every
  masked target is the argmax."""
  logits = nnx.merge(graphdef, params)(ids_BL).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, -1)
  picked = jnp.take_along_axis(logp, targets_BL[..., None], -1)[..., 0]
  greedy = jnp.argmax(logits, -1) == targets_BL
  return (picked * mask_BL).sum(1), jnp.all(greedy | (mask_BL == 0), axis=1)


class SSMLM(LM):
  """An ssm LanguageModel and its tokenizer (ssm.data.tokenizer) as an lm_eval LM."""

  def __init__(self, model, tokenizer, batch_size=8, max_length=2048):
    if LM is object:
      raise ValueError("zero-shot tasks need lm-evaluation-harness: pip install 'ssm-jax[lm]'")
    super().__init__()
    self.model, self.tok = model, tokenizer
    self.batch_size, self.max_length = int(batch_size), int(max_length)
    self.graphdef, self.params = nnx.split(model)
    if model.config.vocab_size < tokenizer.vocab_size:
      raise ValueError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than "
                       f"the tokenizer's ({tokenizer.vocab_size}): give the tokenizer it was "
                       "trained with")

  # --- scoring ------------------------------------------------------------------------
  def _pair(self, context, continuation):
    """(context ids, continuation ids): the whole text encoded once, split where the
    context's own encoding ends; trailing spaces of the context move to the continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = self.tok.encode(context + continuation)
    n = len(self.tok.encode(context)) if context else 0
    return [self.tok.bos_id, *whole[:n]], whole[n:]

  def score(self, pairs):
    """[(log p(continuation | context), is greedy)] for (context ids, continuation ids)
    pairs; the context is cut from the left to fit max_length."""
    rows = []
    for context, continuation in pairs:
      tokens = (list(context) + list(continuation))[-(self.max_length + 1):]
      rows.append((tokens[:-1], tokens[1:], min(len(continuation), len(tokens) - 1)))
    out = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths batch
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      longest = len(rows[chunk[0]][0])
      L = min(1 << max(3, (longest - 1).bit_length()), max(self.max_length, longest))
      ids, targets, mask = (np.zeros((self.batch_size, L), np.int32) for _ in range(3))
      for r, i in enumerate(chunk):
        inputs, labels, n = rows[i]
        ids[r, :len(inputs)], targets[r, :len(labels)] = inputs, labels
        mask[r, len(labels) - n:len(labels)] = 1
      logp, greedy = _score(self.graphdef, self.params, jnp.asarray(ids), jnp.asarray(targets),
                            jnp.asarray(mask))
      for r, i in enumerate(chunk):
        out[i] = (float(logp[r]), bool(greedy[r]))
    return out

  # --- the lm_eval interface ----------------------------------------------------------
  def loglikelihood(self, requests, disable_tqdm=False):
    return self.score([self._pair(*r.args) for r in requests])

  def loglikelihood_rolling(self, requests, disable_tqdm=False):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: PLC0415
    out = []
    for r in requests:
      windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
          self.tok.encode(r.args[0]), self.tok.bos_id, self.max_length, 1)]
      out.append(sum(logp for logp, _ in self.score(windows)))
    return out

  def generate_until(self, requests, disable_tqdm=False):
    """Requests with the same generation settings decode together, batch_size at a time
    (ssm.generate takes ragged prompts)."""
    out, groups = [None] * len(requests), {}
    for i, r in enumerate(requests):
      kwargs = r.args[1]
      until = kwargs.get("until") or []
      until = (until,) if isinstance(until, str) else tuple(until)
      temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
      groups.setdefault((until, int(kwargs.get("max_gen_toks", 256)), temperature), []).append(i)
    stops = [t for t in (self.tok.eos_id, self.tok.bos_id) if t is not None]
    for (until, max_new, temperature), members in groups.items():
      for start in range(0, len(members), self.batch_size):
        chunk = members[start:start + self.batch_size]
        prompts = [[self.tok.bos_id, *self.tok.encode(requests[i].args[0])][-self.max_length:]
                   for i in chunk]
        rows = generate(self.model, prompts, max_new, Sampling(temperature=temperature),
                        stop_tokens=stops).rows()
        for i, ids in zip(chunk, rows, strict=True):
          text = self.tok.decode([t for t in ids if t not in stops])
          for stop in until:
            text = text.split(stop)[0]
          out[i] = text
    return out


def run_tasks(model, tokenizer, tasks, *, include_path=None, limit=None, num_fewshot=None,
              batch_size=8, max_length=2048):
  """lm_eval's simple_evaluate on `tasks` (names, comma-separated or a list); returns
  {task: {metric: value}}."""
  try:
    import lm_eval  # noqa: PLC0415
    from lm_eval.tasks import TaskManager  # noqa: PLC0415
  except ImportError:
    raise ValueError("zero-shot tasks need lm-evaluation-harness: pip install "
                     "'ssm-jax[lm]'") from None
  names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
  manager = TaskManager(include_path=include_path) if include_path else TaskManager()
  unknown = [t for t in names if t not in manager.all_tasks]
  if unknown:
    raise ValueError(f"lm_eval knows no task {', '.join(unknown)} (local task YAMLs: "
                     "--include-path DIR)")
  results = lm_eval.simple_evaluate(
      model=SSMLM(model, tokenizer, batch_size, max_length), tasks=names, limit=limit,
      num_fewshot=num_fewshot, task_manager=manager, log_samples=False, bootstrap_iters=0)
  return {task: {k.split(",")[0]: v for k, v in metrics.items()
                 if isinstance(v, (int, float)) and "stderr" not in k and k != "sample_len"}
          for task, metrics in results["results"].items()}
