"""The scaling comparison (Mamba Figure 4, Chinchilla's recipe): Mamba, Mamba-2 and
Transformer++ (and the hybrid) at four sizes each, matched in FLOPs per token to Mamba at
each size, each trained on tokens_per_param tokens per (non-embedding) parameter; eval
loss against training FLOPs per family, a power law fitted to each, and where the
curves cross (ssm.scaling): scaling.png and scaling.md in the workdir.

  ssm-compare --config configs/compare/scaling.py --workdir runs/compare-scaling
  ssm-compare --config configs/compare/scaling.py --config.tokens_per_param=40
  ssm-compare --config configs/compare/scaling.py:paper     # a GPU pod

CPU (the default): Tiny Shakespeare with its 1024-id BPE (configs/text.py), 256-token
rows of speeches, three layers, Mamba widths 32 to 56 (30k to 78k non-embedding
parameters), Mamba-2 and Transformer++ within 10% of its FLOPs per token (the hybrid:
--config.families='("mamba","mamba2","transformer++","hybrid")', a third longer); the
result and what it does and does not show: docs/results/compare-scaling/.
The paper's setting: the Pile with the GPT-NeoX tokenizer, 2048-token rows,
Mamba-125M to 1.3B (d_model 768 x 24 layers to 2048 x 48) against Transformer++ at
the same FLOPs, GPT-3's learning rates; here on FineWeb-Edu, which streams.
"""

import ml_collections as mlc
from ssm.compare import comparison


def get_config(setting="cpu"):
  c = mlc.ConfigDict()
  c.name = "scaling"
  c.base = "configs/text.py:mamba"
  c.families = ("mamba", "mamba2", "transformer++")  # :paper adds the hybrid
  c.reference = mlc.ConfigDict(dict(family="mamba", n_layer=3))
  c.sizes = (32, 40, 48, 56)
  c.same_depth = True
  c.match = "flops"
  c.tolerance = 0.10  # widths step coarsely at three layers; each run is plotted at its own FLOPs
  c.tokens_per_param = 20.0  # Chinchilla: training tokens per (non-embedding) parameter
  c.seq_lens = ()
  c.seeds = (0,)
  c.lrs = (4e-3,)
  c.select = mlc.ConfigDict(dict(metric="eval_loss", mode="min"))
  c.overrides = mlc.ConfigDict(dict(
      task=dict(seq_len=256, eval_seq_lens=()),
      model=dict(mamba2=dict(headdim=16, d_state=16)),  # Mamba-1's state size at this scale
      # 16 x 256 tokens a step; 12 eval batches are the whole held-out tenth, once
      train=dict(batch_size=16, warmup_steps=20, log_every=50, eval_steps=12),
      checkpoint=dict(every=1000)))
  c.paper = (
      "Mamba Figure 4 (the Pile, GPT-NeoX tokenizer, 2048 tokens): Mamba matches or beats "
      "Transformer++ at every size from 125M to 1.3B at equal FLOPs, the first attention-free "
      "model to do so; Mamba-2 (its Figure 9) matches Mamba at equal FLOPs and trains faster. "
      "Here: a 1 MB corpus and models of 10-100k non-embedding parameters, so absolute "
      "losses are not comparable; the slopes and the ordering at equal compute are.")
  if setting == "paper":
    c.families = ("mamba", "mamba2", "transformer++", "hybrid")
    c.sizes = (768, 1024, 1536, 2048)
    c.reference.n_layer = 24  # the paper deepens 350M+ (48 layers): run those one by one
    c.lrs = (6e-4,)
    c.overrides.task = mlc.ConfigDict(dict(
        path="", hf_dataset="HuggingFaceFW/fineweb-edu", hf_config="sample-10BT",
        eval_split="", tokenizer="EleutherAI/gpt-neox-20b", seq_len=2048,
        max_documents=20_000_000, eval_seq_lens=()))
    # GPT-NeoX's 50,277 ids (padded to 50,280, as Mamba's checkpoints), known offline
    c.overrides.model = mlc.ConfigDict(dict(dtype="bfloat16", vocab_size=50277))
    c.overrides.train.update(batch_size=256, warmup_steps=2000, log_every=100, eval_steps=64)
    c.overrides.checkpoint.every = 2000
  elif setting != "cpu":
    raise ValueError(f"configs/compare/scaling.py:{setting}: expected 'cpu' or 'paper'")
  c.wandb_mode = "auto"
  c.parallel = 2
  return comparison(c)
