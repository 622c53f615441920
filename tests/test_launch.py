"""launch/: the Colab notebook runs top to bottom (smoke mode, CPU) and the shell scripts parse."""
import os
import re
import shutil
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from diffmoe_jax.train import checkpoint
from conftest import subprocess_xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = [os.path.join(ROOT, "launch", name) for name in ("tpu_pod.sh", "slurm.sbatch", "gpu_checks.sh")]


def test_notebook_runs_top_to_bottom_in_smoke_mode(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  monkeypatch.setenv("DIFFMOE_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("DIFFMOE_NOTEBOOK_WORKDIR", workdir)
  monkeypatch.setenv("XLA_FLAGS", subprocess_xla_flags(1))  # one CPU device in the kernel
  notebook = nbformat.read(os.path.join(ROOT, "launch", "colab_tpu.ipynb"), as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
  text = "\n".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []))
  assert "1 cpu device(s)" in text
  assert "RunResult(final_step=3" in text
  # Progress lines only: Orbax logged some 80 INFO lines of its own for these three steps, as the command line does not.
  assert "Building the train step" in text and "orbax" not in text.lower() and "CheckpointManager" not in text
  assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [3]
  assert text.count("tokens that 3.2e22 training FLOPs buy") == 3  # PI, PI-S and PI-P


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shell_scripts_parse(script):
  subprocess.run(["bash", "-n", script], check=True)
  if shutil.which("shellcheck"):
    result = subprocess.run(["shellcheck", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_tpu_pod_script_explains_its_arguments():
  result = subprocess.run(["bash", SCRIPTS[0]], capture_output=True, text=True)
  assert result.returncode == 2 and "usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR" in result.stderr


def test_tpu_pod_script_refuses_a_relative_workdir_or_a_missing_config():
  run = lambda *args: subprocess.run(["bash", SCRIPTS[0], "tpu", "zone", *args], capture_output=True, text=True)
  result = run("configs/tiny.py", "runs/x")  # would land in the copy of the checkout that relaunching deletes
  assert result.returncode == 2 and "error: WORKDIR runs/x must be an absolute path" in result.stderr
  result = run("configs/tiny.py", os.path.join(ROOT, "runs", "x"))  # the same, where the workers' copy lies here too
  assert result.returncode == 2 and f"error: WORKDIR {ROOT}/runs/x lies in this checkout" in result.stderr
  result = run("configs/tnyi.py", "/mnt/runs/x")
  assert result.returncode == 2 and "error: CONFIG configs/tnyi.py is not a file of this checkout" in result.stderr


def test_tpu_pod_script_refuses_a_config_it_would_not_copy(tmp_path):
  """A config that git ignores, or a copy of the repository that is no git checkout, passed the local check; the
  workers then lacked the config, or the script stopped with git's own "fatal: not a git repository"."""
  clone = tmp_path / "clone"
  subprocess.run(["git", "clone", "-q", ROOT, str(clone)], check=True)
  shutil.copy(SCRIPTS[0], clone / "launch" / "tpu_pod.sh")  # this checkout's script, committed or not
  (clone / "configs" / "mine.py").write_text("from configs.tiny import get_config\n")
  with open(clone / ".git" / "info" / "exclude", "a") as f:
    f.write("configs/mine.py\n")
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text("#!/bin/sh\necho 'gcloud ran' >&2\nexit 99\n")  # never reached
  (bin_dir / "gcloud").chmod(0o755)
  run = lambda *args: subprocess.run(["bash", str(clone / "launch" / "tpu_pod.sh"), "tpu", "zone", *args, "/mnt/x"],
                                     capture_output=True, text=True,
                                     env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
  result = run("configs/mine.py")
  assert result.returncode == 2 and "error: CONFIG configs/mine.py is ignored by git" in result.stderr, result.stderr
  result = run(str(clone / "configs" / "mine.py"))
  assert result.returncode == 2 and "error: CONFIG configs/mine.py is ignored by git" in result.stderr, result.stderr
  shutil.rmtree(clone / ".git")
  result = run("configs/tiny.py")
  assert result.returncode == 2 and f"error: {clone} is not a git checkout" in result.stderr, result.stderr


def test_tpu_pod_script_copies_the_checkout_less_files_deleted_locally(tmp_path):
  """A tracked file deleted in the checkout made tar fail; gcloud is a stand-in that keeps the copied archive."""
  clone = tmp_path / "clone"
  subprocess.run(["git", "clone", "-q", ROOT, str(clone)], check=True)
  shutil.copy(SCRIPTS[0], clone / "launch" / "tpu_pod.sh")  # this checkout's script, committed or not
  os.remove(clone / "configs" / "ablation.py")
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(f'#!/bin/sh\n[ "$4" = scp ] && cp "$5" {tmp_path}/copied.tar.gz\nexit 0\n')
  (bin_dir / "gcloud").chmod(0o755)
  result = subprocess.run(["bash", str(clone / "launch" / "tpu_pod.sh"), "tpu", "zone", "configs/tiny.py", "/mnt/x"],
                          capture_output=True, text=True, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
  assert result.returncode == 0, result.stderr
  names = subprocess.run(["tar", "-tzf", str(tmp_path / "copied.tar.gz")], capture_output=True, text=True,
                         check=True).stdout.split()
  assert "configs/tiny.py" in names and "diffmoe_jax/main.py" in names and "configs/ablation.py" not in names


def test_tpu_pod_script_runs_a_config_of_the_checkout_from_the_workers_copy(tmp_path):
  """A config given by its absolute path in this checkout (tab-completed, say) was passed on as that path, which
  the workers do not have. A stand-in gcloud records the training command."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/args\n')
  (bin_dir / "gcloud").chmod(0o755)
  subprocess.run(["bash", SCRIPTS[0], "tpu", "zone", os.path.join(ROOT, "configs", "tiny.py"), "/mnt/runs/x",
                  "--config.train.log_every=5"], check=True, capture_output=True, cwd=tmp_path,
                 env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
  command = (tmp_path / "args").read_text().splitlines()[-1]
  assert command == ("--command=cd diffmoe_jax && python3 -m diffmoe_jax.main --distributed=on "
                     "--config=configs/tiny.py --workdir=/mnt/runs/x --config.train.log_every=5 ")


def test_slurm_script_gives_each_task_the_jobs_cpus(tmp_path):
  """srun stopped inheriting the job's --cpus-per-task (SLURM 22.05): each task ran on one core. A stand-in srun
  records its arguments, one a line."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(f'#!/bin/sh\npwd > {tmp_path}/args\nprintf "%s\\n" "$@" >> {tmp_path}/args\n')
  (bin_dir / "srun").chmod(0o755)

  def srun_args(**environ):
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CPUS_PER_TASK"}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=ROOT, **environ)
    subprocess.run(["bash", SCRIPTS[1], "configs/tiny.py", "/shared/runs/x", "--config.name=a b"], check=True,
                   env=env, cwd=tmp_path)
    return (tmp_path / "args").read_text().splitlines()

  command = ["python", "-m", "diffmoe_jax.main", "--config=configs/tiny.py", "--workdir=/shared/runs/x",
             "--config.name=a b"]
  assert srun_args(SLURM_CPUS_PER_TASK="8") == [ROOT, "--kill-on-bad-exit=1", "--cpus-per-task=8", *command]
  assert srun_args() == [ROOT, "--kill-on-bad-exit=1", *command]  # the job asked for no --cpus-per-task


def test_gpu_checks_select_every_kernel_test_they_name():
  """The GPU script's pytest selection still collects each kind of kernel test (a renamed test would
  otherwise drop out of the GPU run unnoticed)."""
  script = open(SCRIPTS[2]).read()
  kernel_tests = script.split('kernel_tests="', 1)[1].split('"', 1)[0]
  selection = script.split('-k "', 1)[1].split('"', 1)[0].replace("$kernel_tests", kernel_tests)
  result = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                           os.path.join(ROOT, "tests", "test_flash_attention.py"), "-k", selection],
                          capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 0, result.stdout + result.stderr
  collected = [line for line in result.stdout.splitlines() if "::" in line]
  for name in ("test_path_matches_float64_reference[pallas-", "test_path_matches_float64_reference[fused-",
               "test_bf16_inputs[pallas-", "test_bf16_inputs[pallas_mosaic-",
               "test_no_queries_or_no_keys_give_an_empty_or_zero_output[pallas-",
               "test_predictor_mode_is_causal_on_every_path[pallas]",
               "test_predictor_mode_is_causal_on_every_path[pallas_mosaic]", "test_fused_path_uses_cudnn_only",
               "test_gpu_kernels_split_head_widths_into_power_of_two_chunks"):
    assert any(name in line for line in collected), (name, collected)
  assert not any("pallas_tpu" in line for line in collected)


def test_gpu_checks_read_the_fastest_launches_from_the_kernel_sweep():
  """The script's sed picks `bench kernels`' fastest forward, dq and dk/dv launches for the tuned training step (not
  the one-pass kernel's, whose backward the step does not run); a change of that line's format would skip the step
  without an error."""
  from diffmoe_jax import bench, bench_kernels
  from diffmoe_jax.ops import pallas_attention as pa
  default, faster = pa.Launch(32, 32, 4, 2), pa.Launch(64, 16, 8, 3)
  lines = [bench_kernels.best_line(kernel, {default: 2e-3, faster: 1e-3}, default)
           for kernel in ("forward", "dkv_dq", "dq", "dkv")]
  expression = re.search(r"sed -n '([^']+)'", open(SCRIPTS[2]).read()).group(1)
  flags = subprocess.run(["sed", "-n", expression], input="\n".join(lines) + "\n", capture_output=True, text=True,
                         check=True).stdout.split()
  assert flags == ["forward=64,16,8,3", "dq=64,16,8,3", "dkv=64,16,8,3"]
  # pylint: disable-next=protected-access
  assert [bench._gpu_launch(flag) for flag in flags] == [(k, "64,16,8,3") for k in ("forward", "dq", "dkv")]


def test_gpu_checks_run_only_the_steps_named(tmp_path):
  """`gpu_checks.sh LOG_DIR STEP...` runs those steps alone (a stand-in python3 records what ran); a name that is
  no step is an error that lists the steps, before any step runs."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "python3").write_text('#!/bin/sh\necho "ran: $*"\n')
  (bin_dir / "python3").chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
  run = lambda *steps: subprocess.run(["bash", SCRIPTS[2], str(tmp_path / "logs"), *steps], capture_output=True,
                                      text=True, cwd=ROOT, env=env)
  result = run("versions", "train_pi_p_profile")
  assert result.returncode == 0, result.stdout + result.stderr
  assert re.findall(r"^=== (\w+): exit", result.stdout, re.M) == ["versions", "train_pi_p_profile"]
  assert "--profile-top" in open(tmp_path / "logs" / "train_pi_p_profile.log").read()
  result = run("train_pi_p_tuned")  # no kernel sweep in the logs: said, not run
  assert result.returncode == 0 and "train_pi_p_tuned: skipped" in result.stdout, result.stdout
  result = run("versions", "atention")  # refused before any step runs
  assert result.returncode == 2 and not re.search("^=== ", result.stdout, re.M)
  assert "error: there is no step atention; the steps: versions kernel_tests attention" in result.stderr
