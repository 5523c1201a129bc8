"""ssm-info: counts from the abstract model, clear errors."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ssm.info import main


def test_info_prints_the_exact_count(capsys):
  assert main(["mamba-130m"]) == 0
  out = capsys.readouterr().out
  assert "129,135,360" in out and "90,520,320" in out and "padded to 50280" in out


def test_unknown_preset_lists_the_known_ones(capsys):
  assert main(["mamba-9b"]) == 2
  assert "known presets: mamba-130m" in capsys.readouterr().err


def test_console_script_is_installed():
  script = Path(sys.executable).parent / "ssm-info"
  out = subprocess.run([script, "--list"], capture_output=True, text=True, check=True).stdout
  names = out.split()
  for name in ["mamba-130m", "mamba-2.8b", "transformer++-130m", "gpt2-small", "gpt2-medium",
               "vit-ti16", "vit-b16-reg4", "vim-tiny", "vim-small"]:
    assert name in names


def test_exact_counts_of_the_baselines(capsys):
  for name, count in [("gpt2-small", "124,439,808"), ("vit-b16", "86,567,656"),
                      ("vit-s16", "22,050,664"), ("vit-ti16", "5,717,416")]:
    assert main([name]) == 0
    assert re.search(rf"^parameters\s+{count}$", capsys.readouterr().out, re.M)


def test_flops_and_matches(capsys):
  assert main(["mamba-130m", "--seq-len", "1024", "--match", "transformer++"]) == 0
  out = capsys.readouterr().out
  assert "per token at length 1024" in out and "scan" in out
  lines = [l for l in out.splitlines() if l.startswith("transformer++ @")]
  assert len(lines) == 2  # matched on parameters and on training FLOPs
  for line in lines:
    assert abs(float(line.split("(")[-1].rstrip("%)"))) <= 2.0


def test_config_files(capsys):
  assert main(["configs/mqar.py:hybrid"]) == 0
  out = capsys.readouterr().out
  assert "hybrid LM (MA)" in out and "per token at length 64" in out
  assert main(["vit-s16", "--match", "mamba"]) == 2


def test_vision_matches(capsys):
  """--match for a vision preset: each vision family on parameters and on training
  FLOPs per image, within 2%; families of the other kind are an error."""
  assert main(["vit-s16-reg4", "--match", "vit,vim,vim+reg"]) == 0
  out = capsys.readouterr().out
  assert "per image" in out
  lines = [l for l in out.splitlines() if " @ " in l]
  assert [l.split(" @ ")[0] for l in lines] == ["vit", "vit", "vim", "vim", "vim+reg", "vim+reg"]
  for line in lines:
    assert abs(float(line.split("(")[-1].rstrip("%)"))) <= 2.0
  assert main(["vit-s16", "--match", "transformer++"]) == 2
  assert "a vision model matches vit, vit+reg, vim, vim+reg" in capsys.readouterr().err
  assert main(["mamba-130m", "--match", "vim"]) == 2
  assert "language model matches language-model families" in capsys.readouterr().err


def run(capsys, *argv):
  """ssm-info's exit code and its stdout and stderr lines."""
  try:
    code = main(list(argv))
  except SystemExit as e:  # argparse's errors
    code = e.code
  out = capsys.readouterr()
  return code, out.out.splitlines(), out.err.splitlines()


@pytest.mark.parametrize("argv,says", [
    (["mamba-130m", "--seq-len", "-5"], "--seq-len -5: give a length of at least 1 token"),
    (["mamba-130m", "--seq-len", "0"], "--seq-len 0: give a length of at least 1 token"),
    (["mamba-130m", "--seq-len", "abc"], "argument --seq-len: invalid int value: 'abc'"),
    (["mamba-130m", "--match", "transformer"],
     "--match transformer: unknown family (did you mean transformer++?)"),
    (["vit-s16", "--match", "vim+regs"],
     "--match vim+regs: unknown family (did you mean vim+reg?)"),
    (["configs/nope.py:x"], "no config file 'configs/nope.py'"),
    (["gpt2-small", "--seq-len", "4096"],
     "length 4096: gpt2-small has 1024 learned positions; give --seq-len at most 1024"),
    (["mamba130m"], "unknown preset 'mamba130m' (did you mean mamba-130m or mamba2-130m?)"),
    (["."], ". has no config.json: give the --workdir of an ssm-train run"),
])
def test_bad_arguments_are_one_line_and_exit_2(capsys, argv, says):
  code, out, err = run(capsys, *argv)
  assert (code, out, len(err)) == (2, [], 1), err
  assert err[0].startswith(f"ssm-info: {says}"), err[0]


def test_lengths_default_to_the_model_s_positions(capsys):
  code, out, _ = run(capsys, "gpt2-small")
  assert code == 0 and "per token at length 1024 " in "\n".join(out)  # its 1024 positions, not 2048
  code, out, _ = run(capsys, "gpt2-small", "--seq-len", "1024")
  assert code == 0 and "per token at length 1024 " in "\n".join(out)


def test_a_workdir_is_described_from_its_config_json(capsys, tmp_path):
  from ssm.config import load_config_file
  config = load_config_file("configs/mqar.py:hybrid")  # as ssm-train writes it
  (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))
  code, out, _ = run(capsys, str(tmp_path))
  by_file = run(capsys, "configs/mqar.py:hybrid")[1]
  assert code == 0 and out[1:] == by_file[1:] and out[0].split() == ["model", str(tmp_path)]
  assert "per token at length 64 " in "\n".join(out)
