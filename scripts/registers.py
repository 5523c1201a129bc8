r"""The register analysis (ssm.registers) of ViTs with and without registers: token norms
per layer and their high-norm outliers, CLS attention maps per head, what the registers
attend to, and linear probes on frozen features; PNGs and summary.json in --out.

  # the ViT and ViT+registers a comparison trained (ssm-train workdirs)
  python scripts/registers.py --out docs/results/registers \
      --model runs/compare-images/runs/vit-d40-l3-ref40-s0-lr0.003 \
      --model runs/compare-images/runs/vit+reg-d40-l3-ref40-s0-lr0.003

  # DINOv2 against DINOv2 with registers from the hub (a connected machine; a GPU helps)
  python scripts/registers.py --out runs/registers-dinov2 --image-size 224 \
      --model facebook/dinov2-small --model facebook/dinov2-with-registers-small

A --model is an ssm-train workdir (its best checkpoint; its own task's images,
preprocessed as its evaluation) or a Hugging Face checkpoint (a save_pretrained
directory or a hub name: DINOv2, DINOv2 with registers, ViT; --images at --image-size,
ImageNet-normalised). Vision Mamba workdirs get norms and probes, no attention maps.
"""

import argparse
import json
import sys
import time
from pathlib import Path

FASHION = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist


def parse(argv):
  p = argparse.ArgumentParser(prog="scripts/registers.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", action="append", required=True,
                 help="an ssm-train workdir or a Hugging Face checkpoint (repeat for several)")
  p.add_argument("--name", action="append", help="a name per --model (default: its folder)")
  p.add_argument("--out", required=True, help="where the PNGs and summary.json go")
  p.add_argument("--images", default="fashion_mnist",
                 help="the dataset for Hugging Face models: fashion_mnist (Debian's files at "
                 "--data-path) or a tfds name (cifar10, imagenet2012)")
  p.add_argument("--data-path", default=FASHION, help="local files of --images ('' for tfds)")
  p.add_argument("--image-size", type=int, default=0,
                 help="for Hugging Face models (default: the checkpoint's, at most 224)")
  p.add_argument("--n", type=int, default=64, help="images for norms and attention maps")
  p.add_argument("--show", type=int, default=4, help="images per model in the figures")
  p.add_argument("--probe-train", type=int, default=2000,
                 help="training images for the linear probe (0: no probe)")
  p.add_argument("--probe-test", type=int, default=1000, help="test images for the probe")
  p.add_argument("--k", type=float, default=5.0, help="outliers: robust z-score of log norm")
  p.add_argument("--min-ratio", type=float, default=2.0, help="outliers: x the median norm")
  p.add_argument("--threshold", type=float, default=None,
                 help="outliers: a fixed norm instead (Darcet et al.: 150 on DINOv2 ViT-g)")
  p.add_argument("--batch-size", type=int, default=32)
  return p.parse_args(argv)


def images_for(model, run_config, args, split, n, offset=0):
  from ssm import registers
  if run_config is not None:
    if run_config.task.name != "images" or run_config.task.get("as_sequence"):
      raise ValueError(f"the run's task is {run_config.task.name!r}: the register analysis "
                       "needs an image-classification run (configs/images.py)")
    return registers.task_images(run_config.task, split, n, offset)
  c = model.config
  size = args.image_size or min(c.image_size, 224)
  if size % c.patch_size:
    raise ValueError(f"--image-size {size} is not a multiple of the patch size {c.patch_size}")
  if args.images != "fashion_mnist" and args.data_path == FASHION:
    args.data_path = ""  # another dataset: tfds
  return registers.dataset_images(args.images, split, n, size=size, channels=c.channels,
                                  path=args.data_path, offset=offset)


def main(argv=None):
  args = parse(argv)
  names = args.name or [Path(m.rstrip("/")).name for m in args.model]
  if len(names) != len(args.model) or len(set(names)) != len(names):
    print("scripts/registers.py: give one distinct --name per --model", file=sys.stderr)
    return 2
  from ssm import registers
  start = time.time()
  try:
    models, probe, display = {}, {}, None
    for name, spec in zip(names, args.model):
      model, run_config = registers.load(spec)
      if not hasattr(model, "features") or not hasattr(model.config, "patch_size"):
        raise ValueError(f"{spec}: not a vision model (ViT or Vision Mamba)")
      x, _, shown = images_for(model, run_config, args, "eval", args.n)
      display = shown if display is None else display
      models[name] = (model, x)
      if args.probe_train:
        tr_x, tr_y, _ = images_for(model, run_config, args, "train", args.probe_train)
        te_x, te_y, _ = images_for(model, run_config, args, "eval", args.probe_test,
                                   offset=args.n)
        probe[name] = (tr_x, tr_y, te_x, te_y)
    summary, paths, _ = registers.analyse(
        models, None, display, args.out, probe=probe or None, k=args.k,
        min_ratio=args.min_ratio, threshold=args.threshold, batch_size=args.batch_size,
        n_show=args.show)
  except (ValueError, FileNotFoundError, KeyError, ImportError) as e:  # ImportError: [hf]
    print(f"scripts/registers.py: {e.args[0] if e.args else e}", file=sys.stderr)
    return 2
  print(json.dumps(summary, indent=1))
  print(f"figures: {', '.join(map(str, paths))} ({time.time() - start:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
