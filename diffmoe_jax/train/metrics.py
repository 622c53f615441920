"""TensorBoard event files written without TensorFlow, and the stable rank of weight matrices."""
from __future__ import annotations

import itertools
import math
import os
import socket
import time
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tensorboard.compat.proto import types_pb2
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary, SummaryMetadata
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.summary.writer.record_writer import RecordWriter

from diffmoe_jax.train.workdir import WorkdirError

# Tells apart and orders the event files one process opens within a second (zero-padded: names sort as text).
_FILE_NUMBERS = itertools.count()


class MetricWriter:
  """Writes TensorBoard scalars, text and histograms to an event file under `logdir`.

  Each call's events are written and flushed to the OS before it returns (a killed run keeps them), in the
  calling thread, so a failed write (a full disk) raises WorkdirError there, naming the directory and the
  cause. With `enabled=False` (non-primary processes) nothing is created and every call is a no-op.
  """

  def __init__(self, logdir: str | os.PathLike, enabled: bool = True):
    self._records = None
    self._path = os.fspath(logdir)
    if enabled:
      if os.path.exists(self._path) and not os.path.isdir(self._path):
        raise WorkdirError(f"The TensorBoard directory {self._path} is a file, not a directory; move it away, or "
                           "pass another --workdir.")
      # The name TensorBoard's own writer gives: readers take a directory's files in name order.
      name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
              f"{next(_FILE_NUMBERS):06d}")
      try:
        os.makedirs(self._path, exist_ok=True)
        self._records = RecordWriter(open(os.path.join(self._path, name), "wb"))
      except OSError as e:
        raise WorkdirError(f"Cannot write TensorBoard events in {self._path}: {e.strerror or e}; fix its "
                           "permissions, or pass another --workdir.") from None
      self._write(0, Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, step: int, event: Event):
    try:
      self._records.write(event.SerializeToString())
      self._records.flush()
    except OSError as e:
      self._close_quietly()
      raise WorkdirError(f"Cannot write TensorBoard events at step {step} in {self._path}: {e.strerror or e}; "
                         "free space or fix the directory, then rerun to resume from the newest checkpoint.") from None

  def _add(self, step: int, values: list[Summary.Value]):
    self._write(step, Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))

  def scalars(self, step: int, values: Mapping[str, Any]):
    """Writes each `tag: value` (a Python number or a 0-d array) at `step`."""
    if self._records is None:
      return
    self._add(step, [Summary.Value(tag=tag, simple_value=_scalar(tag, value)) for tag, value in values.items()])

  def mark_start(self, step: int):
    """Marks the step this invocation of a run starts from (its checkpoint's, or 0): TensorBoard's Python reader
    then drops the points earlier event files hold past it (logged by an invocation that ended before its next
    checkpoint), which this run logs again; its fast reader ignores the mark and keeps the newest point of a
    step. A run starting at 0 keeps none of them, not even the config's text."""
    if self._records is None:
      return
    first_dropped = step + 1 if step else 0
    self._write(step, Event(wall_time=time.time(), step=first_dropped, session_log=SessionLog(status=SessionLog.START)))

  def text(self, step: int, tag: str, text: str):
    """Writes `text` for TensorBoard's Text tab, which renders it as Markdown."""
    if self._records is None:
      return
    tensor = TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode("utf-8")],
                         tensor_shape=TensorShapeProto())
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="text"))
    self._add(step, [Summary.Value(tag=tag, tensor=tensor, metadata=metadata)])

  def histogram(self, step: int, tag: str, values: Any, bins: int = 30):
    """Writes the distribution of `values` (any shape) in `bins` equal-width buckets.

    NaN and infinite values are left out (a histogram cannot place them); if no finite value is left,
    nothing is written.
    """
    if self._records is None:
      return
    x = np.asarray(values, np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
      return
    counts, edges = np.histogram(x, bins=bins)
    # TensorBoard reads bucket i as (limit[i-1], limit[i]], the first from `min` and the last up to `max`.
    histo = HistogramProto(min=x.min(), max=x.max(), num=x.size, sum=x.sum(), sum_squares=np.dot(x, x),
                           bucket_limit=edges[1:].tolist(), bucket=counts.tolist())
    self._add(step, [Summary.Value(tag=tag, histo=histo)])

  def close(self):
    """Closes the event file."""
    if self._records is not None:
      try:
        self._records.close()
      except OSError as e:
        raise WorkdirError(f"Cannot write TensorBoard events in {self._path}: {e.strerror or e}; free space or fix "
                           "the directory.") from None
      finally:
        self._records = None

  def _close_quietly(self):
    """After a failed write: the file is given up, and its own error already says why."""
    try:
      self._records.close()
    except OSError:
      pass
    self._records = None


def holds_no_step(logdir: str) -> bool:
  """Whether the TensorBoard directory `logdir` holds nothing of any step: event files alone, holding no summary
  but the config's text (what a run writes before its first step)."""
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
  for name in os.listdir(logdir):
    path = os.path.join(logdir, name)
    if not (name.startswith("events.out.tfevents.") and os.path.isfile(path)):
      return False
    if any(value.tag != "config" for event in EventFileLoader(path).Load() for value in event.summary.value):
      return False
  return True


def _scalar(tag: str, value: Any) -> float:
  x = np.asarray(value)
  if x.ndim != 0:
    raise ValueError(f"Scalar {tag!r} has shape {x.shape}; pass a number or a 0-d array (reduce it first, or "
                     "log it with histogram()).")
  return float(x)


# What a train step reports that only a mixture-of-experts FFN has (with a dense FFN they are placeholder zeros).
_MOE_ONLY = ("load_balance_loss", "router_z_loss", "router_noise")


def step_scalars(metrics: Mapping[str, Any], model_config, expert_devices: int = 1,
                 mod_predicted: bool = True) -> dict[str, float]:
  """A train step's metrics (`step.make_train_step`'s, fetched) as TensorBoard scalars: "train/<name>" and
  the per-layer tags of `layer_scalars`.

  Placeholders the model computes where a figure means nothing are left out: the router's losses and noise
  with a dense FFN (`model.ffn="dense"`), and without `mod_predicted` (MoD off: no top-k decision for the
  predictor to match) the predictor's loss.
  """
  skip = set() if model_config.ffn == "moe" else set(_MOE_ONLY)
  if not mod_predicted:
    skip.add("mod_predictor_loss")
  scalars = {f"train/{k}": float(v) for k, v in metrics.items() if k != "layers" and k not in skip}
  scalars.update(layer_scalars(metrics["layers"], model_config, expert_devices, mod_predicted))
  return scalars


def layer_scalars(layers: Mapping[str, Any], model_config, expert_devices: int = 1,
                  mod_predicted: bool = True) -> dict[str, float]:
  """Per-layer statistics as TensorBoard scalars, named after what they are for `model_config`.

  MoE: each layer's max load and, in capacity dispatch, dropped fraction (none with a dense FFN); with experts
  split over `expert_devices` devices (device j holds the j-th contiguous run of experts), each device's share of the
  layer's assignments too, the load expert parallelism balances. λ: each expert's (expert-conditional λ),
  the layer's one λ (`model.expert_conditional_lambda=False`), the mean of the per-token λ
  (`differential_v2`), none for standard attention. MoD: each routed layer's selected fraction and, with
  `mod_predicted`, its predictor's accuracy.
  """
  out = {}
  for l in range(len(layers["lambda"])):
    if model_config.ffn == "moe":
      load = np.asarray(layers["expert_load"][l])
      out[f"moe/layer{l}/max_load"] = float(load.max() * load.size)  # 1.0 is perfectly balanced
      if expert_devices > 1 and load.size % expert_devices == 0:
        for j, share in enumerate(load.reshape(expert_devices, -1).sum(axis=1)):
          out[f"moe/layer{l}/device{j}_load"] = float(share)
      if model_config.moe.dispatch == "capacity":  # dropless dispatch drops nothing
        out[f"moe/layer{l}/dropped_fraction"] = float(layers["dropped_fraction"][l])
    lambdas = np.asarray(layers["lambda"][l])
    if model_config.attention == "differential_v2":
      out[f"lambda/layer{l}/token_mean"] = float(lambdas[0])
    elif model_config.attention == "differential" and model_config.expert_conditional_lambda:
      for e, lam in enumerate(lambdas):
        out[f"lambda/layer{l}/expert{e}"] = float(lam)
    elif model_config.attention == "differential":
      out[f"lambda/layer{l}"] = float(lambdas[0])
  for i, (fraction, accuracy) in enumerate(zip(np.asarray(layers["mod_selected_fraction"]),
                                               np.asarray(layers["mod_predictor_accuracy"]))):
    out[f"mod/routed{i}/selected_fraction"] = float(fraction)
    if mod_predicted:
      out[f"mod/routed{i}/predictor_accuracy"] = float(accuracy)
  return out


POWER_ITERATIONS = 128


def _stable_rank(m: jax.Array) -> jax.Array:
  """Stable rank of each matrix in `m` (`[..., rows, cols]`), in fp32; 0 for an all-zero matrix.

  The spectral norm comes from power iteration on mᵀm (matrix products only): XLA:CPU's batched SVD
  waits on its own intra-op thread pool, and with several devices running it at once that pool can
  starve and hang the step. The Rayleigh quotient errs by at most the gap between the two largest
  squared singular values, and shrinks as (σ₂/σ₁)^(4k) after k iterations.
  """
  m = m.astype(jnp.float32)
  v = jax.random.normal(jax.random.PRNGKey(0), m.shape[:-2] + m.shape[-1:], jnp.float32)

  def iterate(_, v):
    v = jnp.einsum("...rc,...r->...c", m, jnp.einsum("...rc,...c->...r", m, v))
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-30)

  v = jax.lax.fori_loop(0, POWER_ITERATIONS, iterate, v / jnp.linalg.norm(v, axis=-1, keepdims=True))
  top2 = jnp.sum(jnp.einsum("...rc,...c->...r", m, v) ** 2, axis=-1)
  frobenius2 = jnp.sum(m * m, axis=(-2, -1))
  return jnp.where(top2 > 0, frobenius2 / jnp.maximum(top2, 1e-30), 0.0)


# Weight matrices by parameter name: (how many trailing axes form the matrix, how many of those are its rows).
# Attention wq/wk/wv are [embed, heads, head_dim] (rows embed), wo is [heads, head_dim, embed] (rows
# heads*head_dim); expert and dense feed-forward w_in/w_gate/w_out are [in, out].
WEIGHT_MATRICES = {"wq": (3, 1), "wk": (3, 1), "wv": (3, 1), "wo": (3, 2),
                   "w_in": (2, 1), "w_gate": (2, 1), "w_out": (2, 1)}


def stable_ranks(params: Any) -> dict[str, float]:
  """Mean stable rank of every weight matrix in `params`, as {"stable_rank/<param path>": value}.

  A parameter is a weight matrix if its name (last path key) is in `WEIGHT_MATRICES`; its trailing axes given there
  form one matrix (rows × cols), and any leading axes (scanned layers, experts) index separate matrices,
  whose stable ranks are averaged. Boxed (logically partitioned) params are unboxed first. Sharded params
  work, but every process must call this (it runs a jitted computation) even if only one writes it.
  """
  kernels, layouts = {}, []
  for path, w in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))[0]:
    name = jax.tree_util.keystr(path[-1:], simple=True)
    if name not in WEIGHT_MATRICES:
      continue
    tag = "stable_rank/" + jax.tree_util.keystr(path, simple=True, separator="/")
    axes, rows = WEIGHT_MATRICES[name]
    if w.ndim < axes:
      raise ValueError(f"{tag[len('stable_rank/'):]} has shape {w.shape}, but a {name!r} weight needs at least "
                       f"{axes} axes; fix its layout in WEIGHT_MATRICES.")
    kernels[tag] = w
    layouts.append((tag, axes, rows))
  means = _mean_stable_ranks(kernels, tuple(layouts))
  return {tag: float(value) for tag, value in jax.device_get(means).items()}


@jax.jit(static_argnames="layouts")
def _mean_stable_ranks(kernels: dict[str, jax.Array], layouts: tuple[tuple[str, int, int], ...]):
  means = {}
  for tag, axes, rows in layouts:
    w = kernels[tag]
    matrix = w.shape[w.ndim - axes:]
    m = w.reshape(-1, math.prod(matrix[:rows]), math.prod(matrix[rows:]))
    means[tag] = jnp.mean(_stable_rank(m))
  return means


# Dense bf16 peak FLOP/s per device, by the start of `jax.Device.device_kind` (the longest that matches: an
# "NVIDIA H100 PCIe" has a lower peak than the SXM part, "NVIDIA H100 80GB HBM3").
_KNOWN_PEAKS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
                "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H100 PCIe": 756e12,
                "NVIDIA H100 NVL": 835e12, "NVIDIA H200": 989e12, "NVIDIA GH200": 989e12, "NVIDIA A100": 312e12}


def measured_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
  """This host's fp32 matmul rate (best of `repeats`), the CPU's practical peak for MFU."""
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def peak_flops(configured_per_device: float = 0.0) -> float:
  """Peak FLOP/s of all devices together (0.0 when unknown, which turns MFU off).

  CPU devices share one host's cores (simulated devices included), so a CPU run's peak is the measured
  host matmul rate per process, not per device.
  """
  if configured_per_device > 0:
    return configured_per_device * jax.device_count()
  if jax.default_backend() == "cpu":
    return measured_matmul_flops() * jax.process_count()
  return device_peak_flops() * jax.device_count()


def device_peak_flops() -> float:
  """One device's peak FLOP/s: the host's measured matmul rate on CPU, the 16-bit peak of a known
  accelerator, else 0.0."""
  if jax.default_backend() == "cpu":
    return measured_matmul_flops()
  return peak_of_kind(jax.devices()[0].device_kind)


def peak_of_kind(kind: str) -> float:
  """The dense 16-bit peak FLOP/s of an accelerator by its `device_kind`, else 0.0."""
  names = [name for name in _KNOWN_PEAKS if kind.startswith(name)]
  return _KNOWN_PEAKS[max(names, key=len)] if names else 0.0
