"""Writes the data of the local lm-evaluation-harness tasks in configs/lm_eval/ from the
held-out tenth of Tiny Shakespeare (the part configs/text.py and ssm-tokenizer leave
out), so that zero-shot evaluation runs offline on a fresh clone:

  python scripts/lm_eval_tasks.py   # rewrites configs/lm_eval/*.jsonl (deterministic)
  ssm-eval runs/text-mamba --include-path configs/lm_eval \\
      --tasks shakespeare_cloze,shakespeare_ppl,shakespeare_complete

shakespeare_cloze (multiple choice, acc): a line's last word among four, the other
three drawn from other lines' last words. shakespeare_ppl (loglikelihood_rolling: word
and byte perplexity, bits per byte): whole speeches. shakespeare_complete
(generate_until, exact match): the last word of a line from the rest of the line.
"""

import json
import random
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
OUT = ROOT / "configs" / "lm_eval"
CORPUS = ROOT / "ssm" / "data" / "corpora" / "tinyshakespeare.txt"


def main():
  text = CORPUS.read_text()
  held_out = text[int(len(text) * 0.9):]  # task.eval_fraction 0.1's part
  speeches = [s for s in held_out.split("\n\n")[1:] if s.count("\n") >= 2]
  rng = random.Random(0)
  lines = [(s.split("\n")[0], l) for s in speeches for l in s.split("\n")[1:]
           if re.fullmatch(r"[A-Za-z ,']+[a-z]+[.,;:!?]?", l) and len(l.split()) >= 5]
  last = lambda line: re.sub(r"[.,;:!?]$", "", line).split()[-1]
  words = sorted({last(l) for _, l in lines})
  cloze, complete = [], []
  for speaker, line in rng.sample(lines, 60):
    answer = last(line)
    context = f"{speaker}\n{line[:line.rindex(answer)].rstrip()}"
    choices = [answer, *rng.sample([w for w in words if w != answer], 3)]
    rng.shuffle(choices)
    cloze.append(dict(context=context, choices=[" " + c for c in choices],
                      label=choices.index(answer)))
    complete.append(dict(context=context, target=" " + answer))
  ppl = [dict(text=s) for s in rng.sample(speeches, 20)]
  for name, rows in [("cloze", cloze), ("complete", complete[:20]), ("ppl", ppl)]:
    (OUT / f"shakespeare_{name}.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {OUT / f'shakespeare_{name}.jsonl'}: {len(rows)} examples")


if __name__ == "__main__":
  main()
