"""CNN teachers: exact timm architectures and parameter counts, PyTorch parity, BatchNorm modes,
weight-loading errors. Fixtures come from tests/fixtures/make_teacher_fixtures.py (timm 1.0.31)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

from deit_jax import teachers

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
with open(os.path.join(FIXTURES, "teacher_configs.json")) as f:
  TINY = json.load(f)


@pytest.fixture(scope="module")
def io():
  return dict(np.load(os.path.join(FIXTURES, "teacher_io.npz")))


def build_tiny(name, dtype=jnp.float32):
  """The architecture only (nnx.eval_shape): random init would cost one XLA compilation per
  parameter shape, and loading replaces every value anyway."""
  spec = TINY[name]
  cfg = spec["cfg"]
  if spec["kind"] == "regnet":
    model_cls, cfg = teachers.RegNet, teachers.RegNetCfg(**cfg)
  else:
    model_cls = teachers.ResNet
    cfg = teachers.ResNetCfg(cfg["block"], tuple(cfg["layers"]), tuple(cfg["channels"]))
  return nnx.eval_shape(
      lambda: model_cls(cfg, spec["num_classes"], dtype=dtype, rngs=nnx.Rngs(0)))


def tiny_state_dict(name):
  return load_file(os.path.join(FIXTURES, f"teacher_{name}.safetensors"))


def loaded_tiny(name, dtype=jnp.float32):
  model = build_tiny(name, dtype)
  teachers.load_torch_state_dict(model, None, tiny_state_dict(name))
  return model


def snapshot(model):
  return {k: np.array(v.get_value()) for k, v in teachers.torch_variables(model).items()}


def is_abstract(model):
  return all(isinstance(v.get_value(), jax.ShapeDtypeStruct)
             for v in teachers.torch_variables(model).values())


@nnx.jit
def forward(model, x):
  return model(x)


# timm 1.0.31, sum(p.numel() for p in model.parameters()) at 1000 classes.
@pytest.mark.parametrize("name,count", [
    ("regnety_160", 83_590_140),
    ("regnety_002", 3_162_996),
    ("regnety_032", 19_436_338),
    ("resnet50", 25_557_032),
    ("resnet18", 11_689_512),
    ("resnet34", 21_797_672),
])
def test_param_count_matches_timm(name, count):
  abstract = nnx.eval_shape(lambda: teachers.TEACHERS[name](rngs=nnx.Rngs(0)))
  assert teachers.param_count(abstract) == count


def test_param_count_other_num_classes():
  abstract = nnx.eval_shape(lambda: teachers.TEACHERS["regnety_160"](10, rngs=nnx.Rngs(0)))
  assert teachers.param_count(abstract) == 83_590_140 - 990 * (3024 + 1)


@pytest.mark.parametrize("name,stages", [
    # (width, depth, group size) per stage, from timm's RegNet._get_stage_args.
    ("regnety_160", [(224, 2, 112), (448, 4, 112), (1232, 11, 112), (3024, 1, 112)]),
    ("regnety_002", [(24, 1, 8), (56, 1, 8), (152, 4, 8), (368, 7, 8)]),
    ("regnety_032", [(72, 2, 24), (216, 5, 24), (576, 13, 24), (1512, 1, 24)]),
])
def test_regnet_generator_matches_timm(name, stages):
  stage_specs = teachers.regnet_stages(teachers.REGNET_CFGS[name])
  got = [(s.width, s.depth, s.group_size) for s in stage_specs]
  assert got == stages


def test_regnet_se_width_follows_block_input():
  # timm: SE reduction = round(se_ratio * in_chs) of the block input, not of the bottleneck.
  abstract = nnx.eval_shape(lambda: teachers.TEACHERS["regnety_160"](rngs=nnx.Rngs(0)))
  assert abstract.s1.b1.se.fc1.kernel.shape == (1, 1, 224, 8)  # round(32 * .25)
  assert abstract.s1.b2.se.fc1.kernel.shape == (1, 1, 224, 56)  # round(224 * .25)
  assert abstract.s2.b1.conv2.conv.kernel.shape == (3, 3, 112, 448)  # 4 groups of 112


def test_regnet_needs_four_stages():
  with pytest.raises(ValueError, match="exactly 4"):
    teachers.regnet_stages(teachers.RegNetCfg(depth=3, w0=8, wa=8.0, wm=2.0, group_size=4))


@pytest.mark.parametrize("name", sorted(TINY))
def test_eval_parity_with_pytorch(name, io):
  model = loaded_tiny(name)
  model.eval()
  logits = forward(model, jnp.asarray(io["input_nhwc"]))
  assert logits.dtype == jnp.float32
  assert logits.shape == io[f"{name}/logits_eval"].shape
  np.testing.assert_allclose(np.asarray(logits), io[f"{name}/logits_eval"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", sorted(TINY))
def test_train_mode_matches_pytorch_and_updates_running_stats(name, io):
  model = loaded_tiny(name)
  stem_bn = model.stem.bn if isinstance(model, teachers.RegNet) else model.bn1
  old_mean, old_var = np.array(stem_bn.mean.get_value()), np.array(stem_bn.var.get_value())
  model.train()
  logits = forward(model, jnp.asarray(io["input_nhwc"]))
  np.testing.assert_allclose(np.asarray(logits), io[f"{name}/logits_train"], rtol=0, atol=1e-4)

  new_mean, new_var = np.asarray(stem_bn.mean.get_value()), np.asarray(stem_bn.var.get_value())
  assert not np.allclose(new_mean, old_mean)
  torch_mean = io[f"{name}/stem_running_mean_after_train"]
  torch_var = io[f"{name}/stem_running_var_after_train"]
  np.testing.assert_allclose(new_mean, torch_mean, rtol=1e-5, atol=1e-6)
  # Same momentum; PyTorch folds the unbiased batch variance into its running average, flax the
  # biased one (the documented difference). n = batch x stem output height x width.
  n = 2 * 32 * 32
  batch_var_unbiased = (torch_var - 0.9 * old_var) / 0.1
  np.testing.assert_allclose(new_var, 0.9 * old_var + 0.1 * batch_var_unbiased * (n - 1) / n,
                             rtol=1e-4)


def test_eval_mode_is_independent_of_batch_composition(io):
  model = loaded_tiny("regnety_tiny")
  x = jnp.asarray(io["input_nhwc"])
  model.eval()
  np.testing.assert_allclose(np.asarray(forward(model, x[:1])), np.asarray(forward(model, x))[:1],
                             rtol=0, atol=1e-5)
  stats = snapshot(model)
  forward(model, x)
  assert all(np.array_equal(stats[k], v) for k, v in snapshot(model).items())  # eval: no update
  model.train()
  alone, together = forward(model, x[:1]), forward(model, x)
  assert np.abs(np.asarray(alone) - np.asarray(together)[:1]).max() > 1e-2  # batch stats differ


def test_bfloat16_compute_stays_close_to_float32(io):
  x = jnp.asarray(io["input_nhwc"])
  model = loaded_tiny("regnety_tiny", dtype=jnp.bfloat16)
  model.eval()
  logits = forward(model, x)
  assert logits.dtype == jnp.float32
  assert model.stem.conv.kernel.get_value().dtype == jnp.float32  # parameters stay float32
  assert np.abs(np.asarray(logits) - io["regnety_tiny/logits_eval"]).max() < 0.1


def test_teacher_is_trainable(io):
  model = loaded_tiny("resnet_basic_tiny")
  model.train()
  optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)
  x = jnp.asarray(io["input_nhwc"])
  labels = jnp.array([1, 7])

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(4)]
  assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_create_teacher_returns_eval_mode():
  # Traced, not run: the random init of 11.7M parameters is slow to compile on a CPU.
  model = nnx.eval_shape(lambda: teachers.create_teacher("resnet18", num_classes=5, seed=3))
  assert model.bn1.use_running_average and model.layer4[1].bn2.use_running_average
  assert model.fc.kernel.get_value().shape == (512, 5)
  model = teachers.abstract_teacher("regnety_002", num_classes=7)
  assert model.s4.b7.conv3.bn.use_running_average and is_abstract(model)
  assert model.head.fc.kernel.get_value().shape == (368, 7)


def test_random_init_follows_timm():
  # Narrow ResNet: few distinct parameter shapes, so few random-init compilations.
  model = teachers.ResNet(teachers.ResNetCfg("basic", (1, 1), (4, 4)), 10, rngs=nnx.Rngs(0))
  stem = np.asarray(model.conv1.kernel.get_value())  # kaiming_normal fan_out: 2 / (7*7*64)
  assert abs(stem.std() / np.sqrt(2 / (49 * 64)) - 1) < 0.05
  assert np.all(np.asarray(model.layer1[0].bn2.scale.get_value()) == 0)  # zero_init_last
  assert np.all(np.asarray(model.layer1[0].bn1.scale.get_value()) == 1)
  fc = np.asarray(model.fc.kernel.get_value())  # PyTorch's Linear default: U(+-1/sqrt(fan_in))
  assert 0.4 < np.abs(fc).max() <= 0.5
  # RegNet convs: N(0, sqrt(2 / fan_out)) with fan_out = k*k*out // groups.
  kernel = np.asarray(teachers._conv_init(groups=4)(jax.random.key(0), (3, 3, 8, 64)))
  assert abs(kernel.std() / np.sqrt(2 / (9 * 64 // 4)) - 1) < 0.05


def test_describe_build_round_trip(io):
  model = loaded_tiny("regnety_tiny")
  description = teachers.describe(model)
  assert json.loads(json.dumps(description)) == description  # JSON-able, as checkpoints store it
  assert description["family"] == "teacher" and description["name"] is None
  rebuilt = teachers.build(description, abstract=True)
  assert rebuilt.s3.b1.conv2.conv.kernel.get_value().shape == model.s3.b1.conv2.conv.kernel.shape
  assert rebuilt.stem.bn.use_running_average
  teachers.load_torch_state_dict(rebuilt, None, tiny_state_dict("regnety_tiny"))
  np.testing.assert_allclose(np.asarray(forward(rebuilt, jnp.asarray(io["input_nhwc"]))),
                             io["regnety_tiny/logits_eval"], rtol=0, atol=1e-4)

  description = teachers.describe(teachers.abstract_teacher("resnet50", dtype="bfloat16"))
  assert description["name"] == "resnet50" and description["dtype"] == "bfloat16"
  rebuilt = teachers.build(description, abstract=True, num_classes=3, img_size=384)
  assert rebuilt.fc.kernel.get_value().shape == (2048, 3) and rebuilt.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="attention_impl"):
    teachers.build(description, attention_impl="cudnn")


def test_unknown_teacher_name():
  with pytest.raises(ValueError, match="Unknown teacher 'regnety_999'.*regnety_160.*resnet50"):
    teachers.create_teacher("regnety_999")
  with pytest.raises(ValueError, match="Unknown teacher"):
    teachers.load_torch_state_dict(build_tiny("regnety_tiny"), "regnety_999", {})


def test_name_must_match_model():
  with pytest.raises(ValueError, match="not teacher 'regnety_160'"):
    teachers.load_torch_state_dict(build_tiny("regnety_tiny"), "regnety_160", {})


def test_nchw_input_is_rejected():
  model = build_tiny("resnet_basic_tiny")
  with pytest.raises(ValueError, match="NHWC"):
    model(jnp.zeros((1, 3, 32, 32)))


def test_mismatched_state_dict_lists_keys_and_loads_nothing():
  model = build_tiny("regnety_tiny")
  sd = tiny_state_dict("regnety_tiny")
  del sd["s3.b2.se.fc1.bias"]
  del sd["stem.bn.running_var"]
  sd["s9.b1.conv1.conv.weight"] = np.zeros((3, 3, 1, 1), np.float32)
  sd["head.fc.weight"] = np.zeros((11, 64), np.float32)
  with pytest.raises(ValueError) as err:
    teachers.load_torch_state_dict(model, None, sd)
  msg = str(err.value)
  for text in ("nothing was loaded", "missing keys (2)", "s3.b2.se.fc1.bias", "stem.bn.running_var",
               "unexpected keys (1)", "s9.b1.conv1.conv.weight", "shape mismatches (1)",
               "head.fc.weight: checkpoint (11, 64), model (10, 64)"):
    assert text in msg, (text, msg)
  assert is_abstract(model)  # not one variable was assigned

  # A loaded model keeps its values when a later load fails.
  model = loaded_tiny("regnety_tiny")
  before = snapshot(model)
  with pytest.raises(ValueError, match="head.fc.weight"):
    teachers.load_torch_state_dict(model, None, sd)
  after = snapshot(model)
  assert all(np.array_equal(before[k], after[k]) for k in before)


def test_wrapped_and_prefixed_state_dicts_load(io):
  sd = tiny_state_dict("resnet_basic_tiny")
  model = build_tiny("resnet_basic_tiny")
  teachers.load_torch_state_dict(model, None, {"model": {f"module.{k}": v for k, v in sd.items()}})
  model.eval()
  np.testing.assert_allclose(np.asarray(forward(model, jnp.asarray(io["input_nhwc"]))),
                             io["resnet_basic_tiny/logits_eval"], rtol=0, atol=1e-4)


FULL_DIR = os.environ.get("DEIT_TEACHER_FULL_DIR")


@pytest.mark.skipif(not FULL_DIR, reason="opt-in: set DEIT_TEACHER_FULL_DIR to the output of "
                    "make_teacher_fixtures.py --full-size DIR")
@pytest.mark.parametrize("name", ["regnety_160", "resnet50"])
def test_full_size_parity(name):
  full_io = np.load(os.path.join(FULL_DIR, "io.npz"))
  model = teachers.abstract_teacher(name)
  state_dict = load_file(os.path.join(FULL_DIR, f"{name}.safetensors"))
  teachers.load_torch_state_dict(model, name, state_dict)
  logits = np.asarray(forward(model, jnp.asarray(full_io["input_nhwc"])))
  diff = np.abs(logits - full_io[f"{name}/logits_eval"]).max()
  print(f"{name}: max |jax - torch| = {diff:.3g}")
  assert diff < 1e-3
