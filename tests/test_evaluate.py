"""Evaluating a checkpoint: per-domain and per-file loss / bits per byte, the CLI and its errors."""
import fcntl
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmoe_jax import data, evaluate as evaluate_lib
from diffmoe_jax.data import DataError, make_tokenizer
from diffmoe_jax.nn import model as model_lib
from diffmoe_jax.train import loop, resume
from test_cli import assert_one_error, run_cli
from test_train import CONFIG_PATH, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small text domains from this repository: the corpus builds in a second (the built-in one takes longer).
DOMAINS = {"code": f"files:{ROOT}/diffmoe_jax/**/*.py", "docs": f"files:{ROOT}/tests/*.py"}
SHORT_RUN = ("--config.train.run_steps=4", "--config.data.val_fraction=0.3",
             *(f"--config.data.domains.{name}={spec}" for name, spec in DOMAINS.items()))


def short_run_config():
  """The test-sized whole-system config, stopped after 4 steps, on the small domains."""
  config = load_config()
  config.train.run_steps = 4
  config.data.val_fraction = 0.3
  config.data.domains.update(DOMAINS)
  return config


def short_run_workdir() -> str:
  """The workdir of a 4-step run of `short_run_config`, trained once per session (tests only read it): in the
  session directory every pytest-xdist worker shares, so the workers running this file and test_generate.py
  train it once between them. The first to take the lock trains; the other waits for it."""
  workdir = os.path.join(os.environ["DIFFMOE_TEST_SESSION_DIR"], "short_run")
  with open(workdir + ".lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(workdir + ".trained"):
      loop.train(short_run_config(), workdir)
      open(workdir + ".trained", "w").close()
  return workdir


@pytest.fixture(scope="module")
def workdir():
  return short_run_workdir()


def test_file_loss_equals_a_direct_forward_pass(workdir, tmp_path):
  config, params, step = evaluate_lib.restore_params(workdir)
  assert step == 4 and not resume.differences(config, short_run_config())
  # 126 bytes, 120 characters (bits per byte over the characters passed every test where the two were equal):
  # 4 windows of 32, the last one padded.
  text = "def add(a, b):\n    return a + b  # ≥ a\n\n" * 3
  path = tmp_path / "snippet.py"
  path.write_text(text, encoding="utf-8")
  results = evaluate_lib.evaluate(config, params, files=[str(path)], domains=False)
  got = results["files"][str(path)]

  # Reference: each window on its own (no padding), cross-entropy by hand.
  model = model_lib.build_model(config.model)
  host_params = jax.device_get(params)
  tokens = np.frombuffer(text.encode(), np.uint8).astype(np.int32)
  seq_len, total, count = config.model.max_seq_len, 0.0, 0
  for start in range(0, len(tokens) - 1, seq_len):
    window = tokens[start:start + seq_len + 1]
    logits, _ = model.apply({"params": host_params}, jnp.asarray(window[None, :-1]), mod_mode="predictor")
    log_probs = np.asarray(jax.nn.log_softmax(logits[0]), np.float64)
    total -= log_probs[np.arange(len(window) - 1), window[1:]].sum()
    count += len(window) - 1
  assert count == len(tokens) - 1
  np.testing.assert_allclose(got["loss"], total / count, rtol=1e-5)
  np.testing.assert_allclose(got["bits_per_byte"], total / count / math.log(2), rtol=1e-5)  # 1 byte per token
  np.testing.assert_allclose(got["perplexity"], math.exp(got["loss"]), rtol=1e-6)


def test_evaluation_and_generation_use_the_compilation_cache(workdir, tmp_path):
  """restore_params (evaluate's and generate's) turns on the config's persistent compilation cache, as main does:
  each invocation compiled its programs from scratch."""
  config = short_run_config()
  config.train.compilation_cache_dir = str(tmp_path / "xla")
  before = jax.config.jax_compilation_cache_dir
  try:
    evaluate_lib.restore_params(workdir, config)
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


@pytest.mark.parametrize("length", [2, 5, 6, 9, 10])
def test_file_windows_take_every_token_but_the_first_as_a_target_once(length):
  """Windows of seq_len 4 at stride 4 over a stream of `length` tokens: each target once, with its own input
  before it (one start fewer than needed passed every test, leaving the last token of 6 or 10 unscored)."""
  tokens = np.arange(100, 100 + length)
  batches = evaluate_lib.file_batches(tokens, seq_len=4, batch_size=2)
  targets, inputs = [], []
  for b in batches:
    kept = b["weights"] > 0
    targets += b["targets"][kept].tolist()
    inputs += b["inputs"][kept].tolist()
  assert targets == tokens[1:].tolist() and inputs == tokens[:-1].tolist()


def test_domains_match_the_trainers_evaluation(workdir):
  config, params, _ = evaluate_lib.restore_params(workdir)
  results = evaluate_lib.evaluate(config, params)
  assert sorted(results["domains"]) == ["code", "docs"]
  corpus = data.build_corpus(config.data)
  for domain, r in results["domains"].items():
    assert 0 < r["bits_per_byte"] < 20 and r["unigram_bits_per_byte"] == corpus.unigram_bits_per_byte(domain)
    np.testing.assert_allclose(r["perplexity"], math.exp(r["loss"]), rtol=1e-6)
    # Bits per token over bytes per token of the validation text: its separators are tokens but not bytes.
    val = corpus.info(domain, "val")
    assert val.num_bytes < val.num_tokens
    np.testing.assert_allclose(r["bits_per_byte"], r["loss"] / math.log(2) * val.num_tokens / val.num_bytes, rtol=1e-6)
  losses = [r["loss"] for r in results["domains"].values()]
  assert min(losses) <= results["loss"] <= max(losses)


def test_cli_json_and_step(workdir, tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("Mixture of depths routes tokens around a block.\n")
  proc = run_cli("diffmoe_jax.evaluate", f"--workdir={workdir}", "--step=4", "--json", "--nodomains", str(path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout)
  assert out["step"] == 4 and out["domains"] == {} and out["files"][str(path)]["bits_per_byte"] > 0


def test_cli_bad_input_is_one_line(workdir, tmp_path):
  checkpoints = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  assert_one_error(run_cli("diffmoe_jax.evaluate", f"--workdir={tmp_path}"), "holds no checkpoints", "diffmoe_jax.main")
  (tmp_path / "checkpoints").write_text("")  # said "holds no checkpoints (there is no .../checkpoints)"
  assert_one_error(run_cli("diffmoe_jax.evaluate", f"--workdir={tmp_path}"), f"error: {tmp_path}/checkpoints is a "
                   "file, not the run's checkpoints directory; pass the training run's --workdir.")
  assert_one_error(run_cli("diffmoe_jax.evaluate", f"--workdir={tmp_path / 'checkpoints'}"),  # "there is no directory"
                   f"error: {tmp_path}/checkpoints is a file, not a directory; pass the training run's --workdir.")
  (tmp_path / "checkpoints").unlink()
  assert_one_error(run_cli("diffmoe_jax.evaluate", f"--workdir={workdir}", "--step=3"),
                   "no checkpoint at step 3", "its steps are 4")
  assert_one_error(run_cli("diffmoe_jax.evaluate", f"--workdir={workdir}", str(tmp_path / "missing.txt")),
                   "there is no text file", "missing.txt")
  assert_one_error(run_cli("diffmoe_jax.evaluate", f"--workdir={workdir}", f"--config={CONFIG_PATH}",
                           *SHORT_RUN, "--config.model.d_model=24", "--config.model.head_dim=12"),
                   "another shape", "model.d_model 48 -> 24", "Drop --config to use the saved config.")
  (tmp_path / "notes.txt").write_text("Files are evaluated whole.\n")
  assert_one_error(run_cli("diffmoe_jax.evaluate", f"--workdir={workdir}", "--nodomains", "--eval_batches=2",
                           str(tmp_path / "notes.txt")),  # was ignored
                   "--eval_batches sets the batches per validation domain, and --nodomains evaluates none")
  # A batch no device holds: it failed to allocate its windows on the host, with a traceback.
  assert_one_error(run_cli("diffmoe_jax.evaluate", f"--workdir={workdir}", f"--config={CONFIG_PATH}", *SHORT_RUN,
                           "--config.train.eval_batch_size=1000000000"),
                   "error: config.train.eval_batch_size: 1,000,000,000 sequences of ", " per device with the weights, "
                   "but a device here has ", "; pass --config.train.eval_batch_size=<fewer>.")
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == checkpoints  # nothing lost
  assert_one_error(run_cli("diffmoe_jax.evaluate", f"--workdir={workdir}", f"--config={CONFIG_PATH}", *SHORT_RUN,
                           f"--config.data.domains.code=files:{tmp_path}/moved/*.py",
                           "--config.train.allow_config_change=data.domains"),  # said "fix or remove it" alone
                   "matches no file", "The validation domains are the run's config.data.domains: put their files "
                   "back, pass --nodomains to evaluate only the files named, or pass --config")
  incomplete = tmp_path / "incomplete"  # a save cut short where renames are not atomic (a gcsfuse workdir)
  shutil.copytree(workdir, incomplete)
  (incomplete / "checkpoints" / "9").mkdir()
  shutil.copytree(incomplete / "checkpoints" / "4", incomplete / "checkpoints" / "2")  # the one before 9 is 4
  assert_one_error(run_cli("diffmoe_jax.evaluate", f"--workdir={incomplete}"),  # said "saved with config=None"
                   f"error: The checkpoint at step 9 in {incomplete}/checkpoints is incomplete (it has no state: a save "
                   f"cut short); pass --step=4 for the one before it, or remove {incomplete}/checkpoints/9.")


def test_a_batch_the_mesh_does_not_split_gets_rows_that_count_no_token(workdir, tmp_path):
  """eval_batch_size 12 on 8 devices (the run's mesh): each batch gets 4 rows weighted 0, so a file, evaluated
  whole, has the loss it has at a batch of 8 (it was refused, asking for a config override)."""
  path = tmp_path / "notes.txt"
  path.write_text("Differential attention subtracts two softmax maps. " * 40)
  results = []
  for batch_size in (12, 8):
    proc = run_cli("diffmoe_jax.evaluate", f"--workdir={workdir}", f"--config={CONFIG_PATH}", *SHORT_RUN,
                   f"--config.train.eval_batch_size={batch_size}", "--json", "--nodomains", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results.append(json.loads(proc.stdout)["files"][str(path)])
  np.testing.assert_allclose(results[0]["loss"], results[1]["loss"], rtol=1e-5)


@pytest.mark.parametrize("blank", [None, "", " ", "\t"])
def test_a_blank_workdir_is_refused(blank):
  """`--workdir="$RUN"` with RUN holding a space was read as a directory named " " in the current one."""
  from diffmoe_jax.config import ConfigError
  with pytest.raises(ConfigError, match=r"^--workdir is required: the training run's directory"):
    evaluate_lib.require_workdir(blank)


def test_a_workdir_under_home_is_found_as_main_finds_it(workdir, tmp_path, monkeypatch):
  """`--workdir=~/run` names the same directory for evaluate and generate as for main (which expands it)."""
  os.symlink(workdir, tmp_path / "run")
  monkeypatch.setenv("HOME", str(tmp_path))
  config, _, step = evaluate_lib.restore_params("~/run")
  assert step == 4 and config.model.d_model == 48


def byte_level_bpe(path) -> str:
  """A `config.data.tokenizer` spec: a byte-level BPE of 256 bytes and some merges, larger than the short run's
  vocabulary of 256."""
  tokenizers = pytest.importorskip("tokenizers")
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
  bpe.train_from_iterator(["def add(a, b):\n    return a + b\n"] * 8, tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  bpe.save(str(path))
  assert bpe.get_vocab_size() > 256
  return f"hf:{path}"


def test_a_tokenizer_past_the_models_vocabulary_is_refused(workdir, tmp_path):
  """A tokenizer with ids past the embedding table (a config change that train.allow_config_change let through)
  gave a loss of NaN; main refuses it before training, and evaluate and generate now do the same."""
  from diffmoe_jax.config import ConfigError
  config, params, _ = evaluate_lib.restore_params(workdir)
  config.data.tokenizer = byte_level_bpe(tmp_path / "tokenizer.json")
  (tmp_path / "add.py").write_text("def add(a, b):\n    return a + b\n")
  with pytest.raises(ConfigError, match=r"^config\.model\.vocab_size \(256\) is smaller than the tokenizer's "
                     r"vocabulary \(\d+, hf:.*tokenizer\.json\); raise it to at least \d+ \(for a new run\), or use "
                     r"a tokenizer of at most 256 tokens, such as the run's\.$"):
    evaluate_lib.evaluate(config, params, files=[str(tmp_path / "add.py")], domains=False)


def test_a_file_to_evaluate_that_is_not_utf8_says_to_leave_it_off_the_command_line(tmp_path):
  """It said to leave the file out of "the source", the wording for a training domain's files."""
  path = tmp_path / "latin1.txt"
  path.write_bytes("café".encode("latin-1"))
  with pytest.raises(DataError, match=r"^a file to evaluate: .*latin1\.txt is not valid UTF-8 \(byte offset 3: "
                     r"unexpected end of data\); convert it to UTF-8 or leave it off the command line\.$"):
    evaluate_lib.read_text_files([str(path)], make_tokenizer("bytes"))


def test_a_separator_or_a_directory_is_refused(tmp_path):
  path = tmp_path / "zeros.bin"
  path.write_bytes(b"ab\0\0")
  with pytest.raises(DataError, match=r"a file to evaluate: .*zeros\.bin contains '\\x00' at byte offset 2, which "
                     r"the tokenizer 'bytes' reserves to separate documents; remove it from the file\."):
    evaluate_lib.read_text_files([str(path)], make_tokenizer("bytes"))
  with pytest.raises(DataError, match=r"^.* is a directory; name the text files in it, such as .*/\*\.txt\.$"):
    evaluate_lib.read_text_files([str(tmp_path)], make_tokenizer("bytes"))
  os.mkfifo(tmp_path / "pipe")  # read_text_files said "there is no text file" of an existing device or pipe
  for path in ("/dev/null", str(tmp_path / "pipe")):
    with pytest.raises(DataError, match=rf"^{path} is not a regular file \(a device or a pipe\); name a text file\.$"):
      evaluate_lib.read_text_files([path], make_tokenizer("bytes"))


def test_a_damaged_saved_config_is_one_line(workdir, tmp_path):
  import shutil
  old = tmp_path / "old_run"
  shutil.copytree(workdir, old)
  (old / "checkpoints" / "4" / "config" / "metadata").write_text("{\"model\": ")
  assert_one_error(run_cli("diffmoe_jax.evaluate", f"--workdir={old}"),
                   "The config saved with the checkpoint at step 4", "cannot be read", "pass the run's config with --config")


def test_a_config_saved_before_fields_were_added_still_restores(workdir, tmp_path):
  """A run saved by an earlier version of the code lacks the config fields added since: they take their
  defaults (and are named in a warning) instead of failing the restore; the saved files stay as they are."""
  import shutil
  old = tmp_path / "old_run"
  shutil.copytree(workdir, old)
  saved = old / "checkpoints" / "4" / "config" / "metadata"  # the JSON Orbax wrote
  config = json.loads(saved.read_text())
  del config["model"]["attention_gpu_backward"]
  saved.write_text(json.dumps(config))
  restored, _, step = evaluate_lib.restore_params(str(old))
  assert step == 4 and restored.model.attention_gpu_backward == "two_pass"
  assert not resume.differences(restored, short_run_config())
  assert "attention_gpu_backward" not in json.loads(saved.read_text())["model"]


def rotating_workdir(workdir, tmp_path, monkeypatch) -> str:
  """A copy of the short run holding steps 4 and 5, where the first restore of step 5 finds it deleted and
  step 6 saved instead, as a run still training there rotates its checkpoints."""
  import shutil
  from diffmoe_jax.train import checkpoint
  run = tmp_path / "training_run"
  shutil.copytree(workdir, run)
  shutil.copytree(run / "checkpoints" / "4", run / "checkpoints" / "5")
  restore = checkpoint.Checkpointer.restore_verified
  rotated = []

  def restore_during_a_save(self, step, abstract_state):
    if step == 5 and not rotated:
      os.rename(os.path.join(self.directory, "5"), os.path.join(self.directory, "6"))
      rotated.append(step)
    return restore(self, step, abstract_state)

  monkeypatch.setattr(checkpoint.Checkpointer, "restore_verified", restore_during_a_save)
  return str(run)


def test_a_checkpoint_rotated_away_while_read_gives_the_newest(workdir, tmp_path, monkeypatch):
  _, _, step = evaluate_lib.restore_params(rotating_workdir(workdir, tmp_path, monkeypatch))
  assert step == 6


def test_a_step_rotated_away_while_read_is_one_error(workdir, tmp_path, monkeypatch):
  from diffmoe_jax.train import checkpoint
  run = rotating_workdir(workdir, tmp_path, monkeypatch)
  with pytest.raises(checkpoint.CheckpointError, match=r"^The checkpoint at step 5 in .* was deleted while it was "
                     r"being read, by the run training in .*; pass a newer --step, or none for the newest\.$"):
    evaluate_lib.restore_params(run, step=5)


def test_an_override_without_a_config_file_names_the_missing_flag():
  """Without --config, evaluate and generate read the saved config; an override then has no file to apply to
  (absl knew no such flag and said only that)."""
  from diffmoe_jax import cli
  assert cli.check_command_line(["--workdir=runs/tiny", "--noconfig.data.segment_masking"], None) == (
      "--config.data.segment_masking overrides a field of a config file, but no --config is given; pass the file "
      "too, such as --config=configs/tiny.py.")


def test_a_run_trained_on_more_devices_is_read_on_the_devices_here(workdir, tmp_path, caplog):
  """Its saved mesh.shape (data=16) cannot be built on the 8 devices here, and without --config there was no
  way to change it; the mesh only places the arrays, so the same parameters come back."""
  import shutil
  run = tmp_path / "pod_run"
  shutil.copytree(workdir, run)
  saved = run / "checkpoints" / "4" / "config" / "metadata"
  config = json.loads(saved.read_text())
  config["mesh"]["shape"] = {"data": 16, "fsdp": 1, "expert": 1, "tensor": 1}
  saved.write_text(json.dumps(config))
  restored, params, step = evaluate_lib.restore_params(str(run))
  assert step == 4 and restored.mesh.shape.to_dict() == {"data": 1, "fsdp": -1, "expert": 1, "tensor": 1}
  assert "does not fit the 8 devices here; reading the checkpoint with mesh.shape fsdp=-1" in caplog.text
  _, reference, _ = evaluate_lib.restore_params(workdir)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(reference))


@pytest.mark.parametrize("inside, part", [("checkpoints", "checkpoints"), ("checkpoints/4", "checkpoints"),
                                          ("checkpoints/4/state", "checkpoints"), ("tb", "TensorBoard")])
def test_the_checkpoints_directory_as_workdir_names_the_run(workdir, inside, part):
  """Pointing at the checkpoints (or one step) was answered with 'train one with ... --workdir=<there>', and so
  still were a directory inside a step and the TensorBoard directory (main's check, `workdir.run_holding`, names
  them all)."""
  from diffmoe_jax.train import checkpoint
  with pytest.raises(checkpoint.CheckpointError, match=rf"^{os.path.join(workdir, inside)} lies in the {part} "
                     rf"directory of the run in {workdir}; pass the run's own directory, --workdir={workdir}\.$"):
    evaluate_lib.restore_params(os.path.join(workdir, inside))
