"""Induction heads (Mamba paper, section 4.1.2) with a Mamba, attention, Transformer++
or hybrid model: vocab 16 (14 random tokens, an unused no-op, the special token).
Small enough to train on a 2-core CPU in a few minutes: trained at seq_len 64 and
evaluated at 64 .. 1024 (task.eval_seq_lens, each evaluated and reported by the
loop), so the default run already measures extrapolation to 16x its training length.

The learning rate is high (Mamba 1e-2; attention, which does not learn the task at
1e-2, 1e-3) and decays by cosine over 1,500 steps: Mamba learns the task suddenly
(about step 400 here) and extrapolates to 16x if it is still learning fast then, and
the decay after it takes accuracy from about 0.92 (a constant 1e-2) to 1.0 at every
length (docs/results/synthetic-audit.md).

  ssm-train --config configs/induction_heads.py:mamba --workdir runs/ih-mamba
  ssm-train --config configs/induction_heads.py:transformer --workdir runs/ih-tpp
  ssm-train --config configs/induction_heads.py:hybrid --workdir runs/ih-hybrid

The model is already the paper's (2 layers, d_model 64). The paper's setting (section
4.1.2 and appendix E.1: trained at 2^8 = 256, evaluated at 2^6 .. 2^20; batch 8, Adam
without weight decay at a constant learning rate, 1e-3 for Mamba and 2e-4 for
attention; Mamba reported after 25 epochs of 8192 steps, attention with RoPE after
50) is one override away:
  --config.task.seq_len=256 --config.train.steps=204800 --config.train.batch_size=8
  --config.train.lr=1e-3 --config.train.schedule=constant --config.train.warmup_steps=0
  --config.train.weight_decay=0 --config.train.eval_every=8192
  --config.task.eval_seq_lens="(64,128,256,512,1024,2048,4096,8192,16384,32768,65536,131072,262144,524288,1048576)"
(the longest lengths want an accelerator, and attention at 2^20 a lot of memory).
"""

from ssm.config import base, lock, small_lm, task_config


def get_config(arch="mamba"):
  c = base()
  c.task = task_config("induction_heads", vocab_size=16, seq_len=64,
                       eval_seq_lens=(64, 128, 256, 512, 1024))
  c.model = small_lm(arch, 16, "configs/induction_heads.py")
  c.train.steps = 1500
  c.train.batch_size = 32
  c.train.lr = 1e-2 if arch == "mamba" else 1e-3  # attention does not learn it at 1e-2
  c.train.schedule = "cosine"
  c.train.warmup_steps = 0
  c.train.weight_decay = 0.0
  c.train.log_every = 50
  c.train.eval_every = 250
  c.checkpoint.every = 250
  c.wandb.group = "induction_heads"
  c.wandb.job_type = arch
  return lock(c)
