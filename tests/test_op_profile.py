"""op_profile: what an HLO instruction is and which part of the model it belongs to, read from a compiled
module's text, and a profiler trace joined with it."""
import jax
import jax.numpy as jnp
import pytest

from diffmoe_jax import op_profile

# A hand-written module in the compiled text's form: a matmul fusion, an elementwise fusion, two
# custom calls, an asynchronous collective and a sort, under the name stacks JAX and Flax write.
HLO = """HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[8,8]{1,0})->f32[8,8]{1,0}}

%fused_dot (p0: f32[8,8], p1: f32[8,8]) -> f32[8,8] {
  %p0 = f32[8,8]{1,0} parameter(0)
  %p1 = f32[8,8]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_add (p0.1: f32[8,8]) -> f32[8,8] {
  %p0.1 = f32[8,8]{1,0} parameter(0)
  ROOT %add.3 = f32[8,8]{1,0} add(%p0.1, %p0.1)
}

ENTRY %main (x: f32[8,8]) -> f32[8,8] {
  %x = f32[8,8]{1,0} parameter(0)
  %fusion.1 = f32[8,8]{1,0} fusion(%x, %x), kind=kOutput, calls=%fused_dot, metadata={op_name="jit(step)/jvp(Transformer)/groups/layer_0/block/moe/dot_general"}
  %fusion.2 = f32[8,8]{1,0} fusion(%fusion.1), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/transpose(jvp(Transformer))/groups/layer_0/block/attention/head_norm/add"}
  %custom-call.3 = (f32[8,8]{1,0}, s8[64]{0}) custom-call(%fusion.2, %x), custom_call_target="__cublas$gemm", metadata={op_name="jit(step)/transpose(jvp(Transformer))/checkpoint/rematted_computation/groups/layer_0/block/attn_norm/dot_general"}
  %custom-call.4 = f32[8,8]{1,0} custom-call(%x), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(step)/jvp(Transformer)/groups/layer_0/block/attention/pallas_call"}
  %all-to-all-start = ((f32[8,8]{1,0}), f32[8,8]{1,0}) all-to-all-start(%x), metadata={op_name="jit(step)/jvp(Transformer)/embed/all_to_all"}
  %sort.5 = f32[8,8]{1,0} sort(%x), dimensions={1}, metadata={op_name="jit(step)/adam/sort"}
  ROOT %tuple = (f32[8,8]{1,0}) tuple(%x)
}
"""


def test_each_instruction_is_named_by_kind_part_and_pass():
  table = op_profile.instructions(HLO)
  expected = {
      "fusion.1": ("matmul", "moe", "forward"),
      "fusion.2": ("fusion", "attention", "backward"),
      "custom-call.3": ("matmul", "norms", "recompute"),
      "custom-call.4": ("kernel __gpu$xla.gpu.triton", "attention", "forward"),
      "all-to-all-start": ("all-to-all", "embedding", "forward"),
      "sort.5": ("sort", "loss and optimizer", "forward"),
      "dot.1": ("matmul", "no metadata", "forward"),  # inside a fusion
  }
  assert {name: (i.kind, i.part, i.pass_) for name, i in table.items() if name in expected} == expected


def test_breakdown_sums_per_part_and_kind_and_keeps_unnamed_events():
  times = {"fusion.1": 3.0, "fusion.2": 1.0, "custom-call.4": 2.0, "memcpy": 0.5}
  rows = op_profile.breakdown(times, HLO)
  assert [r.name for r in rows] == ["fusion.1", "custom-call.4", "fusion.2", "memcpy"]
  assert op_profile.by_part(rows) == {("moe", "forward"): 3.0, ("attention", "forward"): 2.0,
                                      ("attention", "backward"): 1.0, ("unnamed", "-"): 0.5}
  assert op_profile.by_kind(rows) == {"matmul": 3.0, "kernel __gpu$xla.gpu.triton": 2.0, "fusion": 1.0,
                                      "unnamed": 0.5}
  lines = op_profile.report(rows, calls=2, top=2)
  assert lines[0].startswith("device busy 3250.00 ms per step")
  assert lines[1].split() == ["moe", "forward", "1500.00", "ms", "46.2%"]


def test_a_traced_program_is_split_where_its_time_goes():
  """A large matmul under the name "moe" and a tiny elementwise op under "attention": the trace must give the
  matmul most of the time, and name both instructions from the compiled text."""
  def program(a, b):
    with jax.named_scope("moe"):
      product = a @ b
    with jax.named_scope("attention"):
      return product, jnp.sin(a[:4, :4]) + 1.0

  a = jnp.ones((768, 768), jnp.float32)
  compiled = jax.jit(program).lower(a, a).compile()
  jax.block_until_ready(compiled(a, a))
  hlo = compiled.as_text()
  rows = op_profile.breakdown(op_profile.trace_times(lambda: jax.block_until_ready(compiled(a, a)), hlo, calls=3), hlo)
  assert all(r.instruction is not None for r in rows), rows
  parts = op_profile.by_part(rows)
  assert set(parts) <= {("moe", "forward"), ("attention", "forward"), ("no metadata", "forward")}, parts
  assert parts[("moe", "forward")] > 0.5 * sum(parts.values()), parts
  assert rows[0].instruction.kind == "matmul" and rows[0].instruction.part == "moe"


def test_a_trace_without_the_module_is_an_error():
  with pytest.raises(RuntimeError, match=r"no events of module 'jit_other' \(modules seen: none\)"):
    op_profile.trace_times(lambda: None, "HloModule jit_other, is_scheduled=true", calls=1)


def test_costs_count_each_matmul_and_each_byte_as_often_as_a_loop_runs_them():
  """A compiled scan of three steps of `tanh(x @ w)`: the matmul's FLOPs and each kernel's bytes (operands and
  result) three times over, and the roofline time of each the larger of FLOPs / peak and bytes / bandwidth."""
  def three_steps(x, w):
    return jax.lax.scan(lambda x, _: (jnp.tanh(x @ w), None), x, None, length=3)[0]

  x, w = jax.ShapeDtypeStruct((64, 128), jnp.float32), jax.ShapeDtypeStruct((128, 128), jnp.float32)
  hlo = jax.jit(three_steps).lower(x, w).compile().as_text()
  costs = op_profile.instruction_costs(hlo)
  [matmul] = [name for name, (flops, _) in costs.items() if flops]
  assert costs[matmul] == (3 * 2 * 64 * 128 * 128, 3 * 4 * (64 * 128 + 128 * 128 + 64 * 128))
  [tanh] = [name for name in costs if "tanh" in name]
  assert costs[tanh] == (0, 3 * 4 * 2 * 64 * 128)
  times = op_profile.roofline_times(costs, peak_flops=1e12, bandwidth=1e9)
  assert times[matmul] == pytest.approx(max(costs[matmul][0] / 1e12, costs[matmul][1] / 1e9))
  assert times[tanh] == pytest.approx(costs[tanh][1] / 1e9)
