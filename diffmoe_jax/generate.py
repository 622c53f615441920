"""Generate text from a checkpoint: prefill, then token-by-token decoding with a KV cache.

    python -m diffmoe_jax.generate --workdir=runs/tiny --prompt="def fib(n):"
    python -m diffmoe_jax.generate --workdir=runs/tiny --prompt="import os" --prompt="class " \\
        --temperature=0.8 --top_k=40 --top_p=0.95 --seed=1 --max_new_tokens=200

The config is the checkpoint's unless `--config` is given. Several `--prompt`s are one batch (prompts of
different lengths are padded). Each attention layer keeps a preallocated cache of keys and values with a
mask of its filled slots; mixture-of-depths routes by its causal predictor and a routed layer skips its
block for a token the predictor rejects (writing no KV for it); the MoE is dropless. One prompt streams
its text as it is generated; a batch prints each completion at the end. Prefill and decode tokens/s go
to stderr. A sequence stops at the tokenizer's end-of-document token, after --max_new_tokens, or when
the context (`model.max_seq_len`) is full, which a note on stderr says. Exit code 1 with one line on stderr
for a mistake.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffmoe_jax import config as config_lib
from diffmoe_jax.nn import model as model_lib
from diffmoe_jax.ops import sampling


@dataclasses.dataclass
class Generation:
  tokens: list[np.ndarray]  # each prompt's generated tokens (without the prompt)
  prompt_tokens: int
  prefill_seconds: float
  decode_tokens: int  # tokens computed by decode steps (batch x steps, finished rows included)
  decode_seconds: float
  logits: np.ndarray | None = None  # [B, steps, V] with keep_logits: the logits each new token was drawn from


def make_step(model, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, mod_skip: bool = True,
              vocab_size: int | None = None):
  """(params, cache, tokens [B, T], positions [B, T], last [B], rng) -> (next token [B], logits [B, V], cache).

  Runs `tokens` at `positions` through the model in the causal inference mode, extending the cache, and
  samples the token after position index `last` of each row, among the first `vocab_size` ids (all if None).
  A position past the cache's end is padding.
  """
  def step(params, cache, tokens, positions, last, rng):
    (logits, _), variables = model.apply({"params": params, "cache": cache}, tokens, positions,
                                         mod_mode="predictor", mod_skip=mod_skip, mutable=["cache"])
    logits = logits[jnp.arange(tokens.shape[0]), last]
    token = sampling.sample(logits[:, :vocab_size], rng, temperature=temperature, top_k=top_k, top_p=top_p)
    return token, logits, variables["cache"]
  return jax.jit(step, donate_argnums=1)


def check_request(prompts: list, *, max_seq_len: int, max_new_tokens: int, temperature: float, top_k: int,
                  top_p: float, vocab_size: int = 0) -> None:
  """Raises ValueError naming the first bad prompt or setting (`top_k` against `vocab_size` when given)."""
  if not prompts:
    raise ValueError("no prompt: pass --prompt=<text> (repeat it for a batch).")
  for i, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise ValueError(f"prompt {i + 1} is empty; generation continues a text, so give it at least one token.")
    if len(prompt) >= max_seq_len:
      raise ValueError(f"prompt {i + 1} has {len(prompt)} tokens, but the context (model.max_seq_len) is "
                       f"{max_seq_len}, which leaves no room to generate; shorten it to at most {max_seq_len - 1}.")
  if max_new_tokens < 1:
    raise ValueError(f"--max_new_tokens={max_new_tokens}: generate at least 1 token.")
  sampling.check_settings(temperature=temperature, top_k=top_k, top_p=top_p, prefix="--")
  if vocab_size and top_k > vocab_size:
    raise ValueError(f"--top_k={top_k} exceeds the vocabulary ({vocab_size} tokens); use at most {vocab_size}, or 0 "
                     "to keep every token.")


def encode_prompts(tokenizer, texts: list[str]) -> list[np.ndarray]:
  """The prompts' tokens; ConfigError for text that encodes to none (a subword tokenizer without byte fallback
  drops characters it has no piece for), which check_request would call an empty prompt, and for text holding
  the tokenizer's document separator, as evaluate refuses in a file: the model never trained on it mid-text."""
  from diffmoe_jax.config import ConfigError
  reserved = tokenizer.reserved_text
  for i, text in enumerate(texts):
    if reserved is not None and reserved in text:
      raise ConfigError(f"--prompt number {i + 1} contains {reserved!r} at character {text.index(reserved)}, which "
                        f"the tokenizer {tokenizer.name!r} reserves to separate documents; remove it.")
  prompts = [np.asarray(tokenizer.encode(text), np.int32) for text in texts]
  for i, (text, tokens) in enumerate(zip(texts, prompts)):
    if text and not len(tokens):
      raise ConfigError(f"--prompt number {i + 1} ({text!r}) encodes to no tokens: the tokenizer {tokenizer.name!r} "
                        "(config.data.tokenizer) has no piece for its characters; write it in characters the "
                        "tokenizer was trained on.")
  return prompts


def completion_text(tokenizer, prompt: np.ndarray, tokens) -> str:
  """The text `tokens` add after the tokens of `prompt`: decoded with them, less the prompt's own text. Decoded
  alone, a SentencePiece continuation lost the space its first piece starts with ("the quick" + "brown")."""
  before = tokenizer.decode(prompt)
  text = tokenizer.decode(np.concatenate([prompt, np.asarray(tokens, prompt.dtype)]))
  return text[len(before):] if text.startswith(before) else tokenizer.decode(tokens)


def generate(model, params, prompts: list[np.ndarray], *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None, mod_skip: bool = True,
             on_tokens: Callable[[int, np.ndarray], None] | None = None, keep_logits: bool = False,
             vocab_size: int | None = None) -> Generation:
  """Continues each prompt (int token arrays) by up to `max_new_tokens` tokens within the model's context.

  `vocab_size`: the tokenizer's. A model's vocabulary may be larger (the PI configs' 65,536 with the bytes
  tokenizer); the ids past the tokenizer's have no text and are never drawn.

  `on_tokens(i, tokens [B])` is called with the i-th new token of every row as soon as it is known (rows
  already finished included). Times exclude compilation. Scanned layers are unrolled for decoding
  (`model_lib.unrolled`), and the MoE is dropless whatever `model.moe.eval_dispatch` says (`_dropless`).
  """
  model, params = model_lib.unrolled(model, params)
  model = _dropless(model)
  max_seq_len = model.config.max_seq_len
  check_request(prompts, max_seq_len=max_seq_len, max_new_tokens=max_new_tokens, temperature=temperature,
                top_k=top_k, top_p=top_p)
  batch, lengths = len(prompts), np.array([len(p) for p in prompts])
  cache_len = min(max_seq_len, int(lengths.max()) + max_new_tokens)
  tokens = np.zeros((batch, lengths.max()), np.int32)
  positions = np.full(tokens.shape, cache_len, np.int32)  # past the cache's end: padding, writes nothing
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt)] = prompt
    positions[row, :len(prompt)] = np.arange(len(prompt))
  step = make_step(model, temperature=temperature, top_k=top_k, top_p=top_p, mod_skip=mod_skip, vocab_size=vocab_size)
  rng = jax.random.PRNGKey(seed)
  cache = model_lib.init_cache(model, params, batch, cache_len)
  compiled = {}  # by token shape: the prefill's and the decode step's programs
  kept = []

  def run(cache, tokens, positions, last, i):
    args = (params, cache, tokens, positions, last, jax.random.fold_in(rng, i))
    if tokens.shape not in compiled:
      compiled[tokens.shape] = step.lower(*args).compile()
    start = time.perf_counter()
    next_token, logits, cache = compiled[tokens.shape](*args)
    next_token = np.asarray(next_token)
    seconds = time.perf_counter() - start
    if keep_logits:
      kept.append(np.asarray(logits))
    return next_token, cache, seconds

  next_token, cache, prefill_seconds = run(cache, tokens, positions, lengths - 1, 0)
  room = np.minimum(max_new_tokens, cache_len - lengths)  # tokens each row may add
  out, ended, decode_seconds, steps = [next_token], np.zeros(batch, bool), 0.0, 0
  if on_tokens:
    on_tokens(0, next_token)
  for i in range(1, int(room.max())):
    if eos_id is not None:
      ended |= out[-1] == eos_id
    done = ended | (i >= room)
    if done.all():
      break
    positions = np.where(done, cache_len, lengths - 1 + i).astype(np.int32)[:, None]
    next_token, cache, seconds = run(cache, out[-1][:, None], positions, np.zeros(batch, np.int32), i)
    out.append(next_token)
    decode_seconds, steps = decode_seconds + seconds, steps + 1
    if on_tokens:
      on_tokens(i, next_token)
  generated = np.stack(out, axis=1)
  rows = []
  for row in range(batch):
    row_tokens = generated[row, :room[row]]
    if eos_id is not None and eos_id in row_tokens:
      row_tokens = row_tokens[:list(row_tokens).index(eos_id)]
    rows.append(row_tokens)
  return Generation(rows, int(lengths.sum()), prefill_seconds, steps * batch, decode_seconds,
                    np.stack(kept, axis=1) if keep_logits else None)


def _dropless(model):
  """`model` with its MoE dispatched dropless at inference. Capacity dispatch (`model.moe.eval_dispatch="capacity"`)
  caps each expert per sequence of T tokens at ceil(capacity_factor·T·k/E): the prefill (T: the longest prompt)
  dropped tokens while the one-token decode steps never do, a mix that matches no forward pass."""
  cfg = model.config
  if cfg.ffn != "moe" or cfg.moe.eval_dispatch == "dropless":
    return model
  from absl import logging
  logging.warning("model.moe.eval_dispatch is %r; decoding dispatches the MoE dropless (a capacity per sequence "
                  "has no token-by-token meaning).", cfg.moe.eval_dispatch)
  config = cfg.as_configdict()
  config.moe.update(eval_dispatch="dropless", expert_parallel="off")  # decoding runs on one device
  return model_lib.build_model(config)


def _define_flags() -> dict:
  from absl import flags
  from diffmoe_jax import evaluate
  return {**evaluate.define_checkpoint_flags(),
          "prompt": flags.DEFINE_multi_string("prompt", [], "A prompt; repeat the flag for a batch."),
          "max_new_tokens": flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per prompt."),
          "temperature": flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy."),
          "top_k": flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all)."),
          "top_p": flags.DEFINE_float("top_p", 1.0, "Sample among the most likely tokens whose probabilities "
                                      "sum to top_p, in (0, 1] (1: all)."),
          "seed": flags.DEFINE_integer("seed", 0, "The sampling seed, 0 to 2**32 - 1.", lower_bound=0,
                                       upper_bound=config_lib.MAX_SEED),
          "mod_skip": flags.DEFINE_bool("mod_skip", True, "Skip a routed layer's block for a token its "
                                        "predictor rejects (--nomod_skip: mask it, as the full forward pass does).")}


def _main(argv, flag: dict) -> None:
  from diffmoe_jax import cli, evaluate, validation
  from diffmoe_jax.config import ConfigError
  from diffmoe_jax.data import DataError, make_tokenizer
  from diffmoe_jax.train.checkpoint import CheckpointError
  cli.quiet_library_output()
  cli.refuse_arguments(argv, "pass prompts as --prompt=<text>")
  settings = {k: flag[k].value for k in ("max_new_tokens", "temperature", "top_k", "top_p")}

  def check(prompts, max_seq_len, vocab_size=0):
    try:
      check_request(prompts, max_seq_len=max_seq_len, vocab_size=vocab_size, **settings)
    except ValueError as e:
      raise ConfigError(str(e)) from None

  try:
    workdir = evaluate.require_workdir(flag["workdir"].value)
    check([[0]], 2)  # the settings first: a mistake there is reported before the checkpoint is read
    for i, text in enumerate(flag["prompt"].value):
      try:
        text.encode("utf-8")
      except UnicodeEncodeError as e:  # bytes the shell could not decode arrive as lone surrogates
        raise ConfigError(f"--prompt number {i + 1} is not valid UTF-8 (at character {e.start}); pass it as UTF-8 "
                          "text (check the terminal's or file's encoding).") from None
    config, params, step = evaluate.restore_params(workdir, flag["config"].value, flag["step"].value)
    tokenizer = make_tokenizer(config.data.tokenizer)
    validation.check_tokenizer_vocab(config, tokenizer)
    prompts = encode_prompts(tokenizer, flag["prompt"].value)
    check(prompts, config.model.max_seq_len, min(config.model.vocab_size, tokenizer.vocab_size))
  except (ConfigError, DataError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  model = model_lib.build_model(config.model)
  params = jax.device_put(params, jax.local_devices()[0])  # decoding runs on one device
  stream = len(prompts) == 1
  streamed, shown = [], [""]

  def show(_, tokens):
    if tokens[0] == tokenizer.eos_id:
      return
    streamed.append(int(tokens[0]))
    text = completion_text(tokenizer, prompts[0], streamed)
    if not text.endswith("\ufffd"):  # a byte that starts a character waits for the rest of it
      sys.stdout.write(text[len(shown[0]):])
      sys.stdout.flush()
      shown[0] = text

  if stream:
    sys.stdout.write(flag["prompt"].value[0])
  result = generate(model, params, prompts, seed=flag["seed"].value, eos_id=tokenizer.eos_id,
                    mod_skip=flag["mod_skip"].value, on_tokens=show if stream else None,
                    vocab_size=tokenizer.vocab_size, **settings)
  if stream:
    sys.stdout.write(completion_text(tokenizer, prompts[0], result.tokens[0])[len(shown[0]):] + "\n")
  else:
    for i, (text, prompt, tokens) in enumerate(zip(flag["prompt"].value, prompts, result.tokens)):
      print(f"--- {i + 1}\n{text}{completion_text(tokenizer, prompt, tokens)}")
  max_seq_len, asked = config.model.max_seq_len, settings["max_new_tokens"]
  stopped = [f"prompt {i + 1} after {len(tokens)}" for i, (prompt, tokens) in enumerate(zip(prompts, result.tokens))
             if len(tokens) < asked and len(prompt) + len(tokens) == max_seq_len]
  if stopped:
    print(f"note: the context (model.max_seq_len = {max_seq_len}) filled up: {', '.join(stopped)} of the "
          f"--max_new_tokens={asked} tokens.", file=sys.stderr)
  print(f"checkpoint at step {step}; prefill {result.prompt_tokens} tokens, "
        f"{_rate(result.prompt_tokens, result.prefill_seconds)}; decode {result.decode_tokens} tokens, "
        f"{_rate(result.decode_tokens, result.decode_seconds)}", file=sys.stderr)


def _rate(tokens: int, seconds: float) -> str:
  return f"{tokens / seconds:,.0f} tokens/s" if seconds > 0 else "no time measured"


if __name__ == "__main__":
  from absl import app
  from diffmoe_jax import cli
  _FLAGS = _define_flags()
  app.run(cli.interruptible(lambda argv: _main(argv, _FLAGS)), flags_parser=cli.parse_flags(None))
