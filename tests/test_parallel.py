"""Mesh and rules that cannot split a dimension fail before anything is compiled, naming what and why."""
import flax.linen as nn
import jax
import pytest

from diffmoe_jax import memory, parallel
from diffmoe_jax.config import ConfigError
from diffmoe_jax.validation import validate
from diffmoe_jax.nn import model as model_lib
from diffmoe_jax.train import state as state_lib


@pytest.mark.parametrize("model,mesh,message", [
    # d_model 60 = 3 heads x 20 over fsdp=8: every weight's "embed" axis.
    ({"d_model": 60, "num_heads": 3, "head_dim": 20}, {"data": 1, "fsdp": 8},
     r"params/embed/table has its 'embed' axis of size 60 split over mesh fsdp=8, 8 ways, which does not "
     r"divide 60"),
    # Expert FFN width 30 over tensor=4 (the 4 heads divide; the hidden units do not).
    ({"d_model": 64, "num_heads": 4, "head_dim": 16, "moe.expert_ffn_dim": 30}, {"data": 2, "tensor": 4},
     r"w_in has its 'mlp' axis of size 30 split over mesh tensor=4, 4 ways"),
])
def test_a_mesh_that_cannot_split_a_dimension_is_named(make_config, model, mesh, message):
  config = make_config(**model)
  config.curriculum.tokens_per_batch = 512
  config.mesh.shape.update(mesh)
  assert_refused_before_building(config, message)
  assert len(jax.devices()) == 8


def assert_refused_before_building(config, message):
  validate(config)
  with pytest.raises(ConfigError, match=message):  # the memory preflight, before anything is built
    memory.training_memory_per_device(config, parallel.mesh_shape(config.mesh, 8))
  net = model_lib.build_model(config.model)
  with pytest.raises(ConfigError, match=message):  # and the trainer's state, before compiling
    state_lib.create_state(net, state_lib.make_optimizer(config.optimizer), parallel.make_mesh(config.mesh),
                           parallel.axis_rules(config.mesh), seed=0, seq_len=8)


@pytest.mark.parametrize("rules, mesh, message", [
    # Scanned weights [layers, embed, heads, ...]: flax gave 'tensor' to the heads and left the layers whole.
    ({"layers": "tensor"}, {"data": 4, "tensor": 2}, r"config\.mesh\.axis_rules: params/groups/layer_0/block/attention/"
     r"wk has logical axes 'layers' and 'heads', both mapped to mesh axis 'tensor' \(2 devices\), which can split "
     r"only one dimension of an array; map one of them to other mesh axes"),
    ({"mlp": ("tensor", "expert")}, {"data": 2, "expert": 2, "tensor": 2}, r"moe/w_in has logical axes 'expert' "
     r"and 'mlp', both mapped to mesh axis 'expert'"),
])
def test_rules_that_map_two_axes_of_an_array_to_one_mesh_axis_are_named(make_config, rules, mesh, message):
  config = make_config()
  config.curriculum.tokens_per_batch = 512
  config.mesh.shape.update(mesh)
  config.mesh.axis_rules = tuple((name, rules.get(name, axes)) for name, axes in config.mesh.axis_rules)
  assert_refused_before_building(config, message)


def test_two_axes_of_an_array_may_map_to_a_mesh_axis_of_one_device(make_config):
  """The first case above on a mesh whose 'tensor' axis has one device: nothing is split, nothing refused."""
  config = make_config()
  config.mesh.shape.update(data=8, tensor=1)
  config.mesh.axis_rules = tuple((name, "tensor" if name == "layers" else axes) for name, axes in config.mesh.axis_rules)
  boxed = memory.abstract_state(config)
  shapes = parallel.shard_shapes(boxed, parallel.mesh_shape(config.mesh, 8), parallel.axis_rules(config.mesh))
  assert [shape for _, shape, _ in shapes] == [a.shape for a in jax.tree.leaves(nn.unbox(boxed))]


@pytest.mark.parametrize("change, message", [
    (dict(rules={"length": "data"}), r"config\.mesh\.axis_rules: 'length' maps to \('data',\), but the experts are "
     r"split 2 ways .* routes whole sequences per device"),
    (dict(rules={"batch": ("data", "fsdp")}), r"config\.mesh\.axis_rules: 'batch' maps to \('data', 'fsdp'\), but "
     r"the experts are split 2 ways .* needs the batch split over \('expert',\) too"),
    (dict(rules={"expert": ("expert", "data")}), r"config\.mesh\.axis_rules: 'expert' maps to \('expert', 'data'\), "
     r"and expert parallelism splits the experts over one mesh axis, but \['expert', 'data'\] all have more than "
     r"one device; map 'expert' to one of them, or set model\.moe\.expert_parallel='off'"),
    # The FFN's hidden slices were summed over devices holding other tokens: a wrong loss, without a word.
    (dict(rules={"mlp": "data"}), r"config\.mesh\.axis_rules: 'mlp' maps to \('data',\), but the experts are split "
     r"2 ways .* while the batch is split over \['data'\] too; map 'mlp' to mesh axes the batch rule does not use"),
    (dict(moe={"expert_parallel": "ragged", "dispatch": "dropless"}),
     r"config\.model\.moe\.expert_parallel: 'ragged' needs jax\.lax\.ragged_all_to_all, which XLA:CPU does not "
     r"implement; use 'gather'"),
])
def test_expert_parallelism_the_mesh_or_backend_cannot_run_is_named(make_config, change, message):
  config = make_config()
  config.mesh.shape.update(data=4, expert=2)
  config.model.moe.update(change.get("moe", {}))
  config.mesh.axis_rules = tuple((name, change.get("rules", {}).get(name, axes)) for name, axes in config.mesh.axis_rules)
  shape = parallel.mesh_shape(config.mesh, 8)
  with pytest.raises(ConfigError, match=message):
    parallel.check_expert_parallel(config, shape, "cpu")
  config.model.moe.expert_parallel = "off"  # the same mesh without expert parallelism is fine
  parallel.check_expert_parallel(config, shape, "cpu")


def test_ragged_expert_parallelism_is_left_to_accelerators(make_config):
  config = make_config(**{"moe.expert_parallel": "ragged", "moe.dispatch": "dropless"})
  config.mesh.shape.update(data=4, expert=2)
  parallel.check_expert_parallel(config, parallel.mesh_shape(config.mesh, 8), "gpu")


def test_collective_bytes_count_a_loop_body_once_per_iteration():
  """The trainer's per-step summary: collectives inside scans (layer groups, micro-batches) count once per
  iteration, nested loops multiply, and a collective outside every loop counts once."""
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((8,), ("x",))

  def exchange(c, _):
    return jax.lax.all_to_all(c, "x", 0, 0, tiled=True) * 2.0, None

  def per_device(x):  # x: this device's [8, 8] rows
    twice_three = jax.lax.scan(lambda c, _: (jax.lax.scan(exchange, c, None, length=3)[0], None), x, None, length=2)
    return jax.lax.psum(twice_three[0], "x")

  fn = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("x"), out_specs=P(), check_vma=False))
  hlo = fn.lower(jax.device_put(np.ones((64, 8), np.float32), NamedSharding(mesh, P("x")))).compile().as_text()
  local = 8 * 8 * 4  # bytes of one device's [8, 8] float32 block
  assert parallel.collective_bytes(hlo, "all-to-all") == 2 * 3 * local
  assert parallel.collective_bytes(hlo, "all-reduce") == local


def test_collective_summary_names_the_ragged_exchange_apart_from_all_to_all():
  """XLA:CPU cannot compile ragged_all_to_all, so the GPU/TPU program's instructions are written out: the ragged
  strategy's exchanges were left out of the per-step summary, and must not count as plain all-to-alls."""
  hlo = """ENTRY %main (p: f32[32768,4]) -> f32[32768,4] {
  %p = f32[32768,4]{1,0} parameter(0)
  %ragged-all-to-all.1 = f32[65536,4]{1,0} ragged-all-to-all(%p, %b, %o, %s, %o, %s), replica_groups={{0,1}}
  ROOT %all-to-all.2 = f32[32768,4]{1,0} all-to-all(%p), replica_groups={{0,1}}, dimensions={0}
}"""
  assert parallel.collective_bytes(hlo, "ragged-all-to-all") == 65536 * 4 * 4
  assert parallel.collective_bytes(hlo, "all-to-all") == 32768 * 4 * 4
  assert parallel.collective_summary(hlo) == "all-to-all 0.50 MiB, ragged-all-to-all 1.00 MiB"


@pytest.mark.parametrize("branches", ["branch_computations={%small, %large}",
                                      "true_computation=%large, false_computation=%small"])
def test_collective_bytes_count_a_conditionals_largest_branch(branches):
  """A conditional runs one branch: the bound counts the one with the most (the smallest undercounted)."""
  hlo = f"""HloModule jit_step
%small (a: f32[8]) -> f32[8] {{
  %a = f32[8]{{0}} parameter(0)
  ROOT %all-reduce.1 = f32[8]{{0}} all-reduce(%a), replica_groups={{{{0,1}}}}, to_apply=%sum
}}
%large (b: f32[8]) -> f32[64] {{
  %b = f32[8]{{0}} parameter(0)
  %all-gather.2 = f32[64]{{0}} all-gather(%b), replica_groups={{{{0,1}}}}, dimensions={{0}}
  ROOT %all-reduce.3 = f32[64]{{0}} all-reduce(%all-gather.2), replica_groups={{{{0,1}}}}, to_apply=%sum
}}
ENTRY %main (i: s32[], x: f32[8]) -> f32[64] {{
  %i = s32[] parameter(0)
  %x = f32[8]{{0}} parameter(1)
  ROOT %conditional.4 = f32[64]{{0}} conditional(%i, %x, %x), {branches}
}}"""
  assert parallel.collective_bytes(hlo, "all-reduce") == parallel.collective_bytes(hlo, "all-gather") == 64 * 4


def test_the_memory_preflight_splits_the_batch_by_its_rule(make_config):
  """Activations per device follow `mesh.axis_rules`' batch rule: split over data alone (2 ways), not data x
  fsdp (8 ways), a device holds four times the sequences."""
  config = make_config()
  config.curriculum.tokens_per_batch = 512  # batches of 64 / 32 sequences: every split is whole
  config.mesh.shape.update(data=2, fsdp=4)
  shape = parallel.mesh_shape(config.mesh, 8)
  default = memory.training_memory_per_device(config, shape)["activations"]
  config.mesh.axis_rules = tuple((name, ("data",) if name == "batch" else axes)
                                 for name, axes in config.mesh.axis_rules)
  assert memory.training_memory_per_device(config, shape)["activations"] == pytest.approx(4 * default)


def test_the_memory_preflight_splits_the_heads_by_their_rule(make_config):
  """Heads mapped to no mesh axis are whole on every device, whatever mesh.shape.tensor is."""
  config = make_config()
  config.curriculum.tokens_per_batch = 512
  config.mesh.shape.update(data=4, tensor=2)
  shape = parallel.mesh_shape(config.mesh, 8)
  split = memory.training_memory_per_device(config, shape)["activations"]
  config.mesh.axis_rules = tuple((name, None if name in ("heads", "mlp", "vocab") else axes)
                                 for name, axes in config.mesh.axis_rules)
  assert memory.training_memory_per_device(config, shape)["activations"] > split


def test_the_head_and_expert_counts_are_checked_against_the_axes_the_rules_split_them_over(make_config):
  """mesh.shape.tensor splits the heads only if the rules map them to it: 3 heads with 'heads' mapped to no mesh
  axis train on tensor=2 (which splits the FFN width and vocabulary); experts mapped to fsdp must divide it."""
  config = make_config(num_heads=3, head_dim=16)
  config.curriculum.tokens_per_batch = 512
  config.mesh.shape.update(data=4, tensor=2)
  default_rules = config.mesh.axis_rules
  config.mesh.axis_rules = tuple((name, None if name == "heads" else axes) for name, axes in default_rules)
  validate(config)
  memory.training_memory_per_device(config, parallel.mesh_shape(config.mesh, 8))  # every split divides
  config.mesh.axis_rules = default_rules
  with pytest.raises(ConfigError, match=r"^config\.mesh\.shape\.tensor: 2 does not divide model\.num_heads \(3\); "
                                        r"pick a divisor, or map 'heads' to other mesh axes"):
    validate(config)

  config = make_config(**{"moe.num_experts": 6})
  config.curriculum.tokens_per_batch = 512
  config.mesh.shape.update(data=2, fsdp=4)
  config.mesh.axis_rules = tuple((name, "fsdp" if name == "expert" else axes) for name, axes in config.mesh.axis_rules)
  with pytest.raises(ConfigError, match=r"^config\.mesh\.shape\.fsdp: 4 does not divide model\.moe\.num_experts "
                                        r"\(6\)"):
    validate(config)


def test_every_trainer_refuses_expert_parallelism_the_mesh_cannot_run(make_config, tmp_path):
  """The trainer itself (which the ablation and the architecture search call, not main) checks it before
  compiling: it trained on with the FFN's hidden slices summed over devices holding other tokens."""
  import os
  from diffmoe_jax.train import loop
  config = make_config(vocab_size=256)
  repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config.data.domains = {"code": f"files:{repository}/diffmoe_jax/**/*.py", "docs": f"files:{repository}/tests/*.py"}
  config.data.cache_dir = str(tmp_path / "cache")
  config.curriculum.tokens_per_batch = 512
  config.train.run_steps = 1
  config.mesh.shape.update(data=4, expert=2)
  config.mesh.axis_rules = tuple((name, "data" if name == "mlp" else axes) for name, axes in config.mesh.axis_rules)
  validate(config)
  with pytest.raises(ConfigError, match=r"config\.mesh\.axis_rules: 'mlp' maps to \('data',\)"):
    loop.train(config, str(tmp_path / "run"))
