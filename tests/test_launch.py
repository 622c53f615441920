"""launch/: the Colab notebook runs top to bottom (smoke mode, CPU) and the shell scripts parse."""
import os
import shutil
import subprocess

import nbformat
import pytest
from nbclient import NotebookClient

from diffmoe_jax.train import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = [os.path.join(ROOT, "launch", name) for name in ("tpu_pod.sh", "slurm.sbatch")]


def test_notebook_runs_top_to_bottom_in_smoke_mode(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  monkeypatch.setenv("DIFFMOE_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("DIFFMOE_NOTEBOOK_WORKDIR", workdir)
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")  # one CPU device in the kernel
  notebook = nbformat.read(os.path.join(ROOT, "launch", "colab_tpu.ipynb"), as_version=4)
  NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
  text = "\n".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []))
  assert "1 cpu device(s)" in text
  assert "RunResult(final_step=3" in text
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
