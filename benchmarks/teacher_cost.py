"""Train-step time with the teacher inside the step vs. precomputed teacher outputs.

  python benchmarks/teacher_cost.py --students deit_tiny_distilled_patch16_224,deit_small_distilled_patch16_224 \
      --teacher regnety_160 --batch 16

Random weights and random images (the cost does not depend on them); the precomputed case feeds
the stored top-k form of the teacher's outputs, as a real run does. Prints seconds per step and
images/s for each student, both ways, on the available devices.
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp

from deit_jax import config as base, distill, sharding, teachers, train


def _time(step, state, batch, teacher_params, iters):
  for _ in range(2):
    state, _ = step(state, batch, teacher_params)
  jax.block_until_ready(state)
  t = time.perf_counter()
  for _ in range(iters):
    state, _ = step(state, batch, teacher_params)
  jax.block_until_ready(state)
  return (time.perf_counter() - t) / iters


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--students", default="deit_tiny_distilled_patch16_224,"
                 "deit_small_distilled_patch16_224")
  p.add_argument("--teacher", default="regnety_160")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--kind", default="hard", choices=["hard", "soft"])
  args = p.parse_args()
  n = jax.device_count()
  mesh = sharding.make_mesh(n)
  rules = [(".*", "replicate")]
  teacher_model = teachers.create_teacher(args.teacher)
  teacher = distill.Teacher(teacher_model, student_img_size=224, student_mean=(0.485, 0.456, 0.406),
                            student_std=(0.229, 0.224, 0.225), img_size=None,
                            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), mesh=mesh,
                            rules=rules)
  bsh = sharding.batch_sharding(mesh)
  for name in args.students.split(","):
    c = base.zoo_config(name)
    c.batch_size = args.batch
    c.distillation.kind = args.kind
    plan = train.Plan(num_devices=n, global_batch=args.batch, micro_batch=args.batch,
                      steps_per_epoch=1000, total_steps=100_000, warmup_steps=10, peak_lr=1e-3,
                      num_train_examples=0, num_eval_examples=0, num_classes=1000)
    student = train.build_model_state(c, plan, mesh)
    images = jax.device_put(jax.random.normal(jax.random.key(0), (args.batch, 224, 224, 3)), bsh)
    labels = jax.device_put(jnp.zeros((args.batch,), jnp.int32), bsh)
    k = 1 if args.kind == "hard" else 10
    in_step = train.jit_train_step(c, plan, student, mesh, teacher)
    t_in = _time(in_step, student.init(), {"image": images, "label": labels}, teacher.params,
                 args.iters)
    stored = {"image": images, "label": labels,
              "teacher_topk_indices": jax.device_put(jnp.zeros((args.batch, k), jnp.int32), bsh),
              "teacher_topk_values": jax.device_put(jnp.zeros((args.batch, k)), bsh)}
    pre = train.jit_train_step(c, plan, student, mesh, None)
    t_pre = _time(pre, student.init(), stored, None, args.iters)
    print(json.dumps({"student": name, "teacher": args.teacher, "batch": args.batch,
                      "devices": n, "device_kind": jax.devices()[0].device_kind,
                      "in_step_s": round(t_in, 3), "precomputed_s": round(t_pre, 3),
                      "speedup": round(t_in / t_pre, 2),
                      "in_step_img_s": round(args.batch / t_in, 1),
                      "precomputed_img_s": round(args.batch / t_pre, 1)}), flush=True)


if __name__ == "__main__":
  main()
