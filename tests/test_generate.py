"""Generation: KV-cache decoding against the full forward pass, sampling, the CLI and its errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffmoe_jax import generate as generate_lib
from diffmoe_jax.nn import model as model_lib
from diffmoe_jax.ops import sampling
from test_cli import assert_one_error, run_cli
from test_evaluate import SHORT_RUN, byte_level_bpe, short_run_workdir
from test_train import CONFIG_PATH


@pytest.fixture(scope="module")
def model_and_params(make_config):
  """MoD (predictor-routed, every other layer) and a dropless MoE with expert-conditional λ, context 32;
  five layers, so a trailing full layer follows the two groups (as PI-P's 27th does)."""
  config = make_config(max_seq_len=32, num_layers=5)
  assert config.model.mod.enabled and config.model.ffn == "moe" and config.model.moe.eval_dispatch == "dropless"
  model = model_lib.build_model(config.model)
  params = model.init({"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)},
                      jnp.zeros((1, 8), jnp.int32))["params"]
  return model, params


def full_forward_logits(model, params, prompt, generated):
  """The logits each generated token was drawn from, by one causal forward pass over the whole sequence."""
  sequence = np.concatenate([prompt, generated])
  logits, aux = model.apply({"params": params}, jnp.asarray(sequence[None]), mod_mode="predictor")
  fractions = np.asarray(aux["layers"]["mod_selected_fraction"])
  return np.asarray(logits[0, len(prompt) - 1:len(sequence) - 1]), fractions


PROMPTS = [np.array([5, 9, 1, 33, 7], np.int32), np.array([60, 2, 17, 4, 4, 8, 21, 3, 11], np.int32),
           np.array([42, 13], np.int32)]


@pytest.mark.parametrize("prompts, mod_skip", [(PROMPTS, True), (PROMPTS, False), (PROMPTS[1:2], True)],
                         ids=["batch3-skip", "batch3-mask", "batch1-skip"])
def test_incremental_decoding_equals_the_full_forward_pass(model_and_params, prompts, mod_skip):
  model, params = model_and_params
  result = generate_lib.generate(model, params, prompts, max_new_tokens=12, temperature=0.0, mod_skip=mod_skip,
                                 keep_logits=True)
  for row, prompt in enumerate(prompts):
    generated = result.tokens[row]
    assert len(generated) == 12
    expected, fractions = full_forward_logits(model, params, prompt, generated)
    # Both kinds of routed-layer decision occur, so skipped and computed steps are both checked.
    assert np.all((fractions > 0) & (fractions < 1)), fractions
    np.testing.assert_allclose(result.logits[row], expected, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(generated, np.argmax(expected, axis=-1))  # temperature 0 is greedy


def test_capacity_inference_dispatch_decodes_dropless(make_config):
  """With model.moe.eval_dispatch="capacity" the prefill capped each expert per prompt (dropping tokens) and the
  one-token decode steps did not: the logits matched no forward pass. Decoding is dropless."""
  config = make_config(max_seq_len=32, **{"moe.eval_dispatch": "capacity", "moe.capacity_factor": 0.5})
  model = model_lib.build_model(config.model)
  params = model.init({"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)},
                      jnp.zeros((1, 8), jnp.int32))["params"]
  result = generate_lib.generate(model, params, PROMPTS[:2], max_new_tokens=4, temperature=0.0, keep_logits=True)
  config.model.moe.eval_dispatch = "dropless"
  reference = model_lib.build_model(config.model)
  for row, prompt in enumerate(PROMPTS[:2]):
    expected, _ = full_forward_logits(reference, params, prompt, result.tokens[row])
    np.testing.assert_allclose(result.logits[row], expected, atol=2e-5, rtol=2e-5)


def test_a_rejected_token_leaves_the_routed_layers_cache_untouched(model_and_params):
  """Skipping runs no part of a routed block: with every predictor saying no, a decode step leaves each
  routed layer's cache (keys, values, filled slots) bit for bit as it was, while the full layers store the
  token; the step still equals the masked step."""
  import flax.linen as nn
  from diffmoe_jax.bench_generate import with_predictor_offsets
  model, params = model_and_params
  params = nn.unbox(params)
  groups = params["groups"]["layer_1"]["mod_router"]["predictor_out"].shape[0]
  params = with_predictor_offsets(params, jnp.full((groups,), -50.0))
  model, params = model_lib.unrolled(model, params)
  prompt, position = jnp.asarray([PROMPTS[0]]), len(PROMPTS[0])
  logits = {}
  for mod_skip in (True, False):
    step = generate_lib.make_step(model, mod_skip=mod_skip)
    rng, last = jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32)
    positions = jnp.arange(position, dtype=jnp.int32)[None]
    _, _, cache = step(params, model_lib.init_cache(model, params, 1, 16), prompt, positions, last + position - 1, rng)
    before = jax.tree.map(np.asarray, cache)
    _, logits[mod_skip], after = step(params, cache, jnp.asarray([[7]]), jnp.asarray([[position]]), last, rng)
    if mod_skip:
      for g in range(groups):
        routed, full = (jax.tree.map(np.asarray, after[f"group_{g}"][name]["block"]["attention"]) for name in
                        ("layer_1", "layer_0"))
        jax.tree.map(np.testing.assert_array_equal, routed, before[f"group_{g}"]["layer_1"]["block"]["attention"])
        assert full["filled"][0, position] and not routed["filled"][0, position]
        assert np.any(full["key"][0, position] != before[f"group_{g}"]["layer_0"]["block"]["attention"]["key"][0, position])
  np.testing.assert_allclose(logits[True], logits[False], atol=2e-5, rtol=2e-5)


def test_ids_past_the_tokenizers_vocabulary_are_never_drawn(model_and_params):
  """A model vocabulary larger than the tokenizer's (the PI configs: 65,536 with bytes) drew ids that have no
  text, and decoding them ended the command with a traceback."""
  model, params = model_and_params
  result = generate_lib.generate(model, params, PROMPTS, max_new_tokens=6, temperature=0.0, keep_logits=True,
                                 vocab_size=10)
  assert any(np.any(np.argmax(logits, axis=-1) >= 10) for logits in result.logits)  # the restriction matters
  for tokens, logits in zip(result.tokens, result.logits):
    np.testing.assert_array_equal(tokens, np.argmax(logits[:, :10], axis=-1))


def test_generation_stops_at_the_context(model_and_params):
  model, params = model_and_params
  result = generate_lib.generate(model, params, [np.arange(1, 29, dtype=np.int32), np.array([3], np.int32)],
                                 max_new_tokens=10, temperature=0.0)
  assert [len(t) for t in result.tokens] == [4, 10]  # 28 + 4 fills the context of 32
  # The prefill reads 29 tokens and gives each row's first; 9 decode steps then run both rows (a step more
  # counted passed every test: the tokens/s it prints were too high).
  assert (result.prompt_tokens, result.decode_tokens) == (29, 9 * 2)


def test_a_row_ends_before_its_first_separator(model_and_params):
  """With eos_id, each row is the greedy continuation without it cut before the first eos_id, which is left out;
  a row without one runs to max_new_tokens."""
  model, params = model_and_params
  prompts = PROMPTS  # the programs of test_incremental_decoding_equals_the_full_forward_pass (compilation cache)
  free = generate_lib.generate(model, params, prompts, max_new_tokens=12, temperature=0.0).tokens
  eos_id = int(free[0][3])  # row 0's fourth token
  assert eos_id not in free[0][:3]
  cut = generate_lib.generate(model, params, prompts, max_new_tokens=12, temperature=0.0, eos_id=eos_id).tokens
  for row in range(len(prompts)):
    at = list(free[row]).index(eos_id) if eos_id in free[row] else len(free[row])
    np.testing.assert_array_equal(cut[row], free[row][:at], err_msg=f"row {row}")


def test_sampling_with_a_seed_is_reproducible(model_and_params):
  """The same seed draws the same tokens in a fresh generation (new programs, new cache); another seed others."""
  model, params = model_and_params
  draw = lambda seed: generate_lib.generate(model, params, PROMPTS, max_new_tokens=6, temperature=1.5, top_p=0.95,
                                            seed=seed).tokens
  first, again, other = draw(7), draw(7), draw(8)
  for row in range(len(PROMPTS)):
    np.testing.assert_array_equal(first[row], again[row])
  assert any(not np.array_equal(a, b) for a, b in zip(first, other))


def test_each_step_draws_with_its_own_key(model_and_params):
  """At a temperature so high that the logits no longer matter, each draw is decided by its key's noise alone: one
  key for every step drew the same token at every step of a row."""
  model, params = model_and_params
  tokens = generate_lib.generate(model, params, PROMPTS, max_new_tokens=8, temperature=1e6, seed=3).tokens
  for row in tokens:
    assert len(row) == 8 and len(set(row.tolist())) > 1, row


def test_temperature_zero_is_greedy():
  logits = jnp.asarray([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 0.0]])
  for seed in range(3):
    tokens = sampling.sample(logits, jax.random.PRNGKey(seed), temperature=0.0, top_k=1, top_p=0.1)
    np.testing.assert_array_equal(tokens, [1, 0])


@pytest.mark.parametrize("temperature", [1e-37, 1e-40])
def test_a_tiny_temperature_is_nearly_greedy(temperature):
  """Logits divided by 1e-37 overflow float32, and 1e-40 is flushed to zero: neither may turn into NaN and
  draw an arbitrary token."""
  logits = jnp.asarray([[-5.0, 50.0, 40.0, 1.9]] * 3)
  for settings in ({}, {"top_p": 0.9}, {"top_k": 2}):
    tokens = sampling.sample(logits, jax.random.PRNGKey(0), temperature=temperature, **settings)
    np.testing.assert_array_equal(tokens, [1, 1, 1], err_msg=str(settings))


def draws(logits, n=2000, **kwargs):
  rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
  return np.asarray(sampling.sample(rows, jax.random.PRNGKey(0), **kwargs))


def test_top_k_and_top_p_restrict_the_support():
  probs = np.array([0.05, 0.5, 0.15, 0.3])
  logits = np.log(probs)
  # top-k: the k largest logits.
  assert set(draws(logits, top_k=2)) == {1, 3}
  assert set(draws(logits, top_k=3)) == {1, 2, 3}
  # top-p: the fewest most likely tokens reaching p (0.5 + 0.3 = 0.8 reaches 0.8; 0.81 needs 0.15 more).
  assert set(draws(logits, top_p=0.5)) == {1}
  assert set(draws(logits, top_p=0.8)) == {1, 3}
  assert set(draws(logits, top_p=0.81)) == {1, 2, 3}
  assert set(draws(logits, top_p=1.0)) == {0, 1, 2, 3}
  assert set(draws(logits, top_k=2, top_p=0.5)) == {1}
  # Within the support, the renormalised probabilities: 0.5 / 0.8 and 0.3 / 0.8.
  counts = np.bincount(draws(logits, n=20000, top_p=0.8), minlength=4) / 20000
  np.testing.assert_allclose(counts, [0, 0.625, 0, 0.375], atol=0.02)
  np.testing.assert_array_equal(np.isfinite(sampling.restrict_logits(jnp.asarray([logits]), top_k=2))[0],
                                [False, True, False, True])


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_the_logits(temperature):
  """Drawn from softmax(logits / T) ∝ p^(1/T) (NumPy), not from the untempered p."""
  probs = np.array([0.05, 0.5, 0.15, 0.3])
  want = probs ** (1 / temperature) / np.sum(probs ** (1 / temperature))
  counts = np.bincount(draws(np.log(probs), n=20000, temperature=temperature), minlength=4) / 20000
  np.testing.assert_allclose(counts, want, atol=0.015)  # binomial std <= sqrt(0.25 / 20000) = 0.0035
  assert np.abs(want - probs).max() > 0.1  # the tolerance tells the two apart


def test_top_p_restricts_the_tempered_distribution():
  """Drawn from softmax(logits / T) restricted by top_p (the docstring's order): at T = 2 the fewest most likely
  tokens reaching 0.7 are three (NumPy, float64); top_p on the untempered probabilities keeps two (0.5 + 0.3)."""
  probs = np.array([0.05, 0.5, 0.15, 0.3])
  tempered = probs ** 0.5 / np.sum(probs ** 0.5)
  order = np.argsort(-tempered)
  reach = np.searchsorted(np.cumsum(tempered[order]), 0.7) + 1  # tokens until the sum reaches 0.7
  want = set(order[:reach].tolist())
  assert want == {1, 2, 3}
  assert set(draws(np.log(probs), temperature=2.0, top_p=0.7)) == want


@pytest.fixture(scope="module")
def workdir():
  return short_run_workdir()


def test_cli_generates_a_batch_and_streams_one_prompt(workdir):
  # The first prompt's 27 tokens leave room for 5 of the 6 new tokens in the context of 32, which a note says
  # (they stopped there silently).
  proc = run_cli("diffmoe_jax.generate", f"--workdir={workdir}", f"--prompt=def f({'x' * 21}", "--prompt=import",
                 "--max_new_tokens=6", "--temperature=0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "--- 1\ndef f(" in proc.stdout and "--- 2\nimport" in proc.stdout
  assert "prefill 33 tokens" in proc.stderr and "tokens/s" in proc.stderr
  assert ("note: the context (model.max_seq_len = 32) filled up: prompt 1 after 5 of the --max_new_tokens=6 "
          "tokens.") in proc.stderr
  proc = run_cli("diffmoe_jax.generate", f"--workdir={workdir}", "--prompt=class A", "--max_new_tokens=5",
                 "--temperature=0.9", "--top_k=20", "--top_p=0.9", "--seed=2")
  assert proc.returncode == 0 and proc.stdout.startswith("class A"), proc.stderr[-3000:]


def test_cli_bad_input_is_one_line(workdir, tmp_path):
  generate = lambda *args: run_cli("diffmoe_jax.generate", *args)
  assert_one_error(generate(f"--workdir={tmp_path}", "--prompt=x"), "holds no checkpoints")
  assert_one_error(generate(f"--workdir={workdir}", "--prompt=x", "--top_p=0"), "--top_p=0.0 must lie in (0, 1]")
  assert_one_error(generate(f"--workdir={workdir}", "--prompt=x", "--top_p=1.5"), "--top_p=1.5 must lie in (0, 1]")
  assert_one_error(generate(f"--workdir={workdir}", "--prompt="), "prompt 1 is empty")
  # A byte the shell could not decode as UTF-8 (Latin-1 é) arrives as a lone surrogate.
  assert_one_error(generate(f"--workdir={workdir}", "--prompt=x", "--prompt=caf\udce9"),
                   "--prompt number 2 is not valid UTF-8 (at character 3)")
  assert_one_error(generate(f"--workdir={workdir}", "--prompt=" + "x" * 32),
                   "prompt 1 has 32 tokens, but the context (model.max_seq_len) is 32")


def test_a_flagfile_that_cannot_be_opened_is_one_line(tmp_path):
  """Prompts kept in a file of flags (`--flagfile`): a missing one was a traceback from defining --config."""
  assert_one_error(run_cli("diffmoe_jax.generate", f"--workdir={tmp_path}", f"--flagfile={tmp_path / 'prompts.txt'}"),
                   "--flagfile: Unable to open flagfile", "No such file or directory", "prompts.txt")


def test_a_tokenizer_past_the_models_vocabulary_is_one_line(workdir, tmp_path):
  """Its prompt ids lay past the embedding table: the logits were NaN and the command printed nothing."""
  tokenizer = byte_level_bpe(tmp_path / "tokenizer.json")
  assert_one_error(run_cli("diffmoe_jax.generate", f"--workdir={workdir}", f"--config={CONFIG_PATH}", *SHORT_RUN,
                           f"--config.data.tokenizer={tokenizer}", "--config.train.allow_config_change=data.tokenizer",
                           "--prompt=def add(a, b):", "--max_new_tokens=4", "--temperature=0"),
                   "config.model.vocab_size (256) is smaller than the tokenizer's vocabulary")


def test_a_seed_beyond_32_bits_is_refused(tmp_path):
  """PRNGKey keeps 32 bits of the seed: 2**32 drew what 0 draws, and 2**64 failed with a traceback."""
  for seed in (2**32, 2**64):
    assert_one_error(run_cli("diffmoe_jax.generate", f"--workdir={tmp_path}", "--prompt=x", f"--seed={seed}"),
                     f"error: --seed={seed}: {seed} is not an integer in the range [0, 4294967295]")


def test_a_reader_closing_the_output_ends_the_command_quietly():
  """`generate ... | head -c 100` closes the pipe while the text still streams: exit 141 as for SIGPIPE, not a
  BrokenPipeError traceback (evaluate and generate share `cli.interruptible`)."""
  import subprocess
  import sys
  from test_cli import ROOT
  streaming = "from diffmoe_jax import cli\ncli.interruptible(lambda argv: [print('x' * 1000) for _ in range(10000)])([])"
  proc = subprocess.Popen([sys.executable, "-c", streaming], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  assert proc.stdout.read(100) == b"x" * 100
  proc.stdout.close()
  assert proc.wait(timeout=60) == 141 and proc.stderr.read() == b""


def test_a_prompt_the_tokenizer_cannot_encode_is_named(tmp_path):
  """A BPE without byte fallback drops characters it has no piece for: "日本" became no tokens, reported as
  "prompt 2 is empty"."""
  from diffmoe_jax.config import ConfigError
  from diffmoe_jax.data import make_tokenizer
  tokenizers = pytest.importorskip("tokenizers")
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  bpe.train_from_iterator(["hello world"] * 4, tokenizers.trainers.BpeTrainer(
      vocab_size=60, special_tokens=["<|endoftext|>"], show_progress=False))
  bpe.save(str(tmp_path / "tokenizer.json"))
  tokenizer = make_tokenizer(f"hf:{tmp_path / 'tokenizer.json'}")
  assert [len(p) for p in generate_lib.encode_prompts(tokenizer, ["hello", "world"])] == [1, 1]
  with pytest.raises(ConfigError, match=r"^--prompt number 2 \('日本'\) encodes to no tokens: the tokenizer "
                     r"'hf:.*tokenizer\.json' \(config\.data\.tokenizer\) has no piece for its characters"):
    generate_lib.encode_prompts(tokenizer, ["hello", "日本"])
  with pytest.raises(ConfigError, match=r"^--prompt number 1 contains '<\|endoftext\|>' at character 5, which the "
                     r"tokenizer 'hf:.*' reserves to separate documents; remove it\.$"):
    generate_lib.encode_prompts(tokenizer, ["hello<|endoftext|>world"])


def test_a_prompt_holding_the_document_separator_is_refused():
  """The bytes tokenizer's NUL was decoded across, though the model never saw it mid-text (evaluate refuses it)."""
  from diffmoe_jax.config import ConfigError
  from diffmoe_jax.data import make_tokenizer
  with pytest.raises(ConfigError, match=r"^--prompt number 2 contains '\\x00' at character 2, which the tokenizer "
                     r"'bytes' reserves to separate documents; remove it\.$"):
    generate_lib.encode_prompts(make_tokenizer("bytes"), ["abc", "ab\0cd"])


def test_a_completion_keeps_the_space_its_first_piece_starts_with(tmp_path):
  """generate printed the prompt, then the new tokens decoded alone: SentencePiece drops the space a text's first
  piece starts with, so "the quick" went on as "the quickbrown fox"."""
  import io
  from diffmoe_jax.data import make_tokenizer
  spm = pytest.importorskip("sentencepiece")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(["the quick brown fox jumps over the lazy dog"] * 20),
                                 model_writer=model, vocab_size=40, model_type="bpe", minloglevel=2)
  (tmp_path / "sp.model").write_bytes(model.getvalue())
  tokenizer = make_tokenizer(f"sentencepiece:{tmp_path / 'sp.model'}")
  prompt, whole = (np.asarray(tokenizer.encode(t), np.int32) for t in ("the quick", "the quick brown fox"))
  np.testing.assert_array_equal(whole[:len(prompt)], prompt)
  assert tokenizer.decode(whole[len(prompt):]) == "brown fox"  # the piece "▁brown" decoded alone
  assert generate_lib.completion_text(tokenizer, prompt, whole[len(prompt):]) == " brown fox"
  bytes_tokenizer = make_tokenizer("bytes")  # an unfinished character stays a replacement until it is complete
  assert generate_lib.completion_text(bytes_tokenizer, np.frombuffer(b"caf", np.uint8).astype(np.int32),
                                      [0xC3]) == "\ufffd"


@pytest.mark.parametrize("settings, message", [
    ({"temperature": float("inf")}, r"--temperature=inf must be a finite number >= 0 \(0 is greedy\)\."),
    ({"top_k": 300}, r"--top_k=300 exceeds the vocabulary \(256 tokens\); use at most 256, or 0 to keep every token\."),
])
def test_settings_that_would_be_silently_ignored_are_refused(settings, message):
  request = {"max_new_tokens": 4, "temperature": 0.0, "top_k": 0, "top_p": 1.0, **settings}
  with pytest.raises(ValueError, match=message):
    generate_lib.check_request([[1, 2]], max_seq_len=32, vocab_size=256, **request)


def test_the_decoding_benchmark_text_covers_any_length():
  """A prompt longer than the benchmark's text (its own source) was cut short, and decoding ran past the end."""
  from diffmoe_jax import bench_generate
  from diffmoe_jax.data import make_tokenizer
  tokenizer = make_tokenizer("bytes")
  with open(bench_generate.__file__, encoding="utf-8") as f:
    text = np.asarray(tokenizer.encode(f.read()), np.int32)
  length = 2 * len(text) + 5
  tokens = bench_generate.source_tokens(tokenizer, length)
  assert tokens.shape == (length,)
  np.testing.assert_array_equal(tokens, np.concatenate([text, text, text[:5]]))
