"""`python -m diffmoe_jax.bench generate`: prefill and decode tokens/s, MoD skipping against masking.

A config's model with fresh weights whose mixture-of-depths predictors are shifted so that each routed
layer selects `--capacity` of the tokens of a fixed text (what a trained predictor learns to
approximate); the MoE is dropless as at inference. The text is prefilled, then decoded one token per
step through the KV cache (teacher-forced, so every run sees the calibrated decisions), with routed
layers skipping their block for rejected tokens and with them masking (running the block, as the full
forward pass does), in turns; each figure is a median over --reps runs' steps, compilation excluded.
"""
from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def add_parser(commands) -> None:
  from diffmoe_jax.bench import POSITIVE, SEED, _config_file, _fraction
  p = commands.add_parser("generate", help="prefill / decode tokens/s; MoD skipping vs masking at decode")
  p.add_argument("--config", type=_config_file, default="configs/tiny.py")
  p.add_argument("--batch", type=POSITIVE, default=1)
  p.add_argument("--prompt-len", type=POSITIVE, default=64)
  p.add_argument("--new-tokens", type=POSITIVE, default=128)
  p.add_argument("--capacity", type=_fraction, default=0.25,
                 help="the fraction of tokens each routed layer's predictor selects")
  p.add_argument("--reps", type=POSITIVE, default=3)
  p.add_argument("--seed", type=SEED, default=0)
  p.set_defaults(run=run)


def with_predictor_offsets(params: dict, offsets: jax.Array) -> dict:
  """Params whose routed layers' predictor logits are shifted by `offsets` `[groups]`: hidden unit 0
  becomes the constant gelu(1), and its output weight carries the shift."""
  router = params["groups"]["layer_1"]["mod_router"]
  hidden, bias, out = router["predictor_hidden"], router["predictor_hidden_bias"], router["predictor_out"]
  router = dict(router, predictor_hidden=hidden.at[:, :, 0].set(0.0), predictor_hidden_bias=bias.at[:, 0].set(1.0),
                predictor_out=out.at[:, 0].set(offsets / jax.nn.gelu(1.0)))
  groups = dict(params["groups"], layer_1=dict(params["groups"]["layer_1"], mod_router=router))
  return dict(params, groups=groups)


def calibrate(model, params: dict, tokens: jax.Array, capacity: float, iterations: int = 40) -> tuple[dict, np.ndarray]:
  """(params whose routed layers each select about `capacity` of `tokens`, the fractions they select),
  by bisection on each layer's predictor shift (all layers at once: each depends on the earlier ones)."""
  selected = jax.jit(lambda p: model.apply({"params": p}, tokens, mod_mode="predictor")[1]["layers"]
                     ["mod_selected_fraction"])
  groups = params["groups"]["layer_1"]["mod_router"]["predictor_out"].shape[0]
  low, high = jnp.full((groups,), -50.0), jnp.full((groups,), 50.0)
  for _ in range(iterations):
    mid = (low + high) / 2
    too_many = selected(with_predictor_offsets(params, mid)) > capacity
    low, high = jnp.where(too_many, low, mid), jnp.where(too_many, mid, high)
  params = with_predictor_offsets(params, (low + high) / 2)
  return params, np.asarray(selected(params))


def _timed_decoding(model, params, sequence: jax.Array, prompt_len: int, reps: int) -> dict:
  """{"skipping" / "masking": (prefill seconds, decode seconds per step)}: `sequence` `[B, L]`'s first
  `prompt_len` tokens prefilled, the rest decoded one step at a time, teacher-forced (each step still
  samples, as generation does). The two run in lockstep, a step of one then the same step of the other,
  so a change in machine load affects both alike."""
  from diffmoe_jax import generate as generate_lib
  from diffmoe_jax.nn import model as model_lib
  model, params = model_lib.unrolled(model, params)
  batch, length = sequence.shape
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  last, rng = jnp.zeros((batch,), jnp.int32), jax.random.PRNGKey(0)
  cache = model_lib.init_cache(model, params, batch, length)
  programs = {}
  for name in ("skipping", "masking"):
    step = generate_lib.make_step(model, temperature=1.0, mod_skip=name == "skipping")
    programs[name] = [step.lower(params, cache, sequence[:, t0:t1], positions[:, t0:t1], last, rng).compile()
                      for t0, t1 in ((0, prompt_len), (0, 1))]
  # Each step's tokens and positions, sliced before the clock runs (a slice is a dispatch of its own).
  steps = [(t0 > 0, sequence[:, t0:t1], positions[:, t0:t1])
           for t0, t1 in [(0, prompt_len)] + [(t, t + 1) for t in range(prompt_len, length)]]
  times = {name: ([], []) for name in programs}
  for _ in range(reps):
    caches = {name: model_lib.init_cache(model, params, batch, length) for name in programs}
    for decoding, tokens, step_positions in steps:
      for name, (prefill, decode) in programs.items():
        start = time.perf_counter()
        _, _, caches[name] = jax.block_until_ready((decode if decoding else prefill)(
            params, caches[name], tokens, step_positions, last, rng))
        times[name][decoding].append(time.perf_counter() - start)
  return {name: (statistics.median(p), statistics.median(d)) for name, (p, d) in times.items()}


def source_tokens(tokenizer, length: int) -> np.ndarray:
  """`length` tokens of real text, this file's own source, repeated where it is shorter (it was cut short: a
  prompt longer than the file decoded past the end of the sequence)."""
  with open(__file__, encoding="utf-8") as f:
    tokens = np.asarray(tokenizer.encode(f.read()), np.int32)
  return np.resize(tokens, length)


def run(args: argparse.Namespace) -> None:
  from diffmoe_jax import config as config_lib, validation
  from diffmoe_jax.data import make_tokenizer
  from diffmoe_jax.nn import model as model_lib
  config = validation.validate(config_lib.load_file(args.config))
  cfg = config.model
  if not (cfg.mod.enabled and cfg.scan_layers and cfg.mod.every == 2):
    raise SystemExit(f"error: {args.config}: the benchmark needs MoD on every other layer with scanned layers.")
  length = args.prompt_len + args.new_tokens
  if length > cfg.max_seq_len:
    raise SystemExit(f"error: --prompt-len + --new-tokens ({length}) exceeds the context of {cfg.max_seq_len} "
                     "(model.max_seq_len).")
  model = model_lib.build_model(cfg)
  init_key, noise_key = jax.random.split(jax.random.PRNGKey(args.seed))
  params = nn.unbox(model.init({"params": init_key, "noise": noise_key}, jnp.zeros((1, 8), jnp.int32))["params"])
  tokens = source_tokens(make_tokenizer(config.data.tokenizer), length)
  sequence = jnp.asarray(np.tile(tokens, (args.batch, 1)))
  params, fractions = calibrate(model, params, sequence, args.capacity)

  times = _timed_decoding(model, params, sequence, args.prompt_len, args.reps)
  prefill = statistics.median(args.batch * args.prompt_len / p for p, _ in times.values())
  decode = {name: args.batch / d for name, (_, d) in times.items()}
  print(f"generate: {config.name} on {jax.default_backend()}, batch {args.batch}, prompt {args.prompt_len}, "
        f"{args.new_tokens} decoded tokens, medians over {args.reps} runs")
  print(f"  routed layers select {', '.join(f'{f:.2f}' for f in fractions)} of the tokens")
  print(f"  prefill                 {prefill:10,.0f} tokens/s")
  for name, rate in decode.items():
    print(f"  decode, MoD {name:<9}  {rate:10,.0f} tokens/s  ({1e3 * args.batch / rate:.2f} ms per step)")
  print(f"  decode speed, skipping / masking: {decode['skipping'] / decode['masking']:.2f}x")
