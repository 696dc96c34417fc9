r"""Pictures of where a DeiT's class and distillation tokens look, and how alike they are.

  python -m deit_jax.visualize --checkpoint workdirs/demo/hard --config configs/demo_distill.py:hard
  python launch.py --config configs/demo_distill.py:hard --mode=visualize --workdir workdirs/demo/hard

For the first `--num_images` images of the config's eval split (its eval transform and
normalization, un-normalized for display) it writes to `--out` (default `<workdir>/pictures`):

  attention.png   one row per image: the image | cls rollout | dist rollout | cls last layer |
                  dist last layer, each map a heatmap over the image (a model without a
                  distillation token: the cls columns only);
  similarity.png  the cosine similarity of the class and distillation tokens, layer by layer
                  (input embeddings, then after each block), mean over the images (distilled
                  models only);
  visualize.json  the similarity numbers (mean and per image), the predictions, the files.

Rollout is Abnar & Zuidema's attention rollout: per layer the heads' attention averaged, the
identity added (the residual), rows renormalized; the layers multiplied from the input up.

`token_similarity(aux)` and `rollout(attentions)` are pure numpy/jax, for the trainer to call.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from deit_jax.checkpoint import CheckpointError

ATTENTION_FILE = "attention.png"
SIMILARITY_FILE = "similarity.png"
JSON_FILE = "visualize.json"
# The DeiT paper (section 5.2): cls/dist cosine similarity of a trained DeiT-B, input and output.
PAPER_SIMILARITY = (0.06, 0.93)


class VisualizeError(CheckpointError):
  """A checkpoint or request that cannot be pictured (e.g. a CNN: it has no attention); a
  CheckpointError, so the launcher prints it as one line."""


# ----------------------------------------------------------------------------------------------
# The computations (pure numpy / jax.numpy; no model, no files).
# ----------------------------------------------------------------------------------------------
def _num_layers(aux: Mapping[str, Any], prefix: str) -> int:
  n = 0
  while f"{prefix}{n}" in aux:
    n += 1
  return n


def token_layers(aux: Mapping[str, Any]) -> list:
  """The token sequences [B, N, D] of one forward pass: the input embeddings, then every block's
  output (`model(x, return_aux=True)`'s 'embeddings', 'block0', ...)."""
  return [aux["embeddings"]] + [aux[f"block{i}"] for i in range(_num_layers(aux, "block"))]


def token_similarity(aux: Mapping[str, Any], a: int = 0, b: int = 1, *, xp=np):
  """Cosine similarity of tokens `a` and `b` (class, distillation) per layer: [layers, B] for
  the layers of `token_layers` (embeddings, block0, ..., block{L-1}). xp: numpy or jax.numpy."""
  sims = []
  for x in token_layers(aux):
    x = xp.asarray(x).astype(xp.float32)
    u, v = x[:, a], x[:, b]
    norm = xp.linalg.norm(u, axis=-1) * xp.linalg.norm(v, axis=-1)
    sims.append(xp.sum(u * v, axis=-1) / xp.maximum(norm, 1e-12))
  return xp.stack(sims)


def attention_layers(aux: Mapping[str, Any]) -> list:
  """Every block's attention weights [B, heads, N, N] ('attention0', ...), input first."""
  n = _num_layers(aux, "attention")
  if not n:
    raise VisualizeError("The forward pass returned no attention weights: call the model with "
                         "return_aux=True, return_attention=True.")
  return [aux[f"attention{i}"] for i in range(n)]


def rollout(attentions: Sequence, *, head_fusion: str = "mean", xp=np):
  """Attention rollout (Abnar & Zuidema 2020): per layer A = mean over heads, A + I, rows
  renormalized to 1, then the layers multiplied, `A_L @ ... @ A_1`. attentions: [B, heads, N, N]
  per layer, input first. Returns [B, N, N]: row i is how much each input token flows into
  token i at the output."""
  if not len(attentions):
    raise ValueError("rollout needs the attention of at least one layer.")
  result = None
  for att in attentions:
    att = xp.asarray(att).astype(xp.float32)
    fused = att.mean(axis=1) if head_fusion == "mean" else att.max(axis=1)
    n = fused.shape[-1]
    fused = fused + xp.eye(n, dtype=xp.float32)
    fused = fused / fused.sum(axis=-1, keepdims=True)
    result = fused if result is None else xp.matmul(fused, result)
  return result


def token_maps(attention, token: int, num_prefix: int) -> np.ndarray:
  """Row `token` of [B, N, N] (or head-averaged [B, heads, N, N]) attention over the patches only,
  as [B, grid, grid] maps scaled to [0, 1] per image (min -> 0, max -> 1: rollout maps are
  nearly flat otherwise)."""
  att = np.asarray(attention, np.float32)
  if att.ndim == 4:
    att = att.mean(axis=1)
  patches = att[:, token, num_prefix:]
  grid = int(round(math.sqrt(patches.shape[-1])))
  if grid * grid != patches.shape[-1]:
    raise ValueError(f"{patches.shape[-1]} patch tokens do not form a square grid.")
  maps = patches.reshape(-1, grid, grid)
  maps = maps - maps.min(axis=(1, 2), keepdims=True)
  return maps / np.maximum(maps.max(axis=(1, 2), keepdims=True), 1e-12)


def attention_columns(aux: Mapping[str, Any], distilled: bool) -> dict[str, np.ndarray]:
  """{column title: [B, grid, grid] maps}: cls (and dist) rollout, then the last layer's."""
  layers = attention_layers(aux)
  num_prefix = 2 if distilled else 1
  rolled = rollout(layers)
  tokens = [("cls", 0)] + ([("dist", 1)] if distilled else [])
  columns = {f"{name} rollout": token_maps(rolled, t, num_prefix) for name, t in tokens}
  columns.update({f"{name} last layer": token_maps(layers[-1], t, num_prefix)
                  for name, t in tokens})
  return columns


def unnormalize(images, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Normalized NHWC images back to [0, 1] for display."""
  x = np.asarray(images, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  return np.clip(x, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Pictures.
# ----------------------------------------------------------------------------------------------
def _upsample(maps: np.ndarray, size: int) -> np.ndarray:
  """[B, g, g] -> [B, size, size], bilinear (jax.image.resize)."""
  import jax
  out = jax.image.resize(maps, (maps.shape[0], size, size), "bilinear")
  return np.clip(np.asarray(out), 0.0, 1.0)


def plot_attention(images: np.ndarray, columns: Mapping[str, np.ndarray], path: str,
                   titles: Sequence[str] | None = None) -> str:
  """One row per image: the image, then each column's map overlaid as a heatmap."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  n, size = images.shape[0], images.shape[1]
  ncols = 1 + len(columns)
  fig, axes = plt.subplots(n, ncols, figsize=(2.2 * ncols, 2.2 * n), squeeze=False)
  gray = images.mean(axis=-1)
  for r in range(n):
    axes[r, 0].imshow(images[r], interpolation="nearest")
    axes[r, 0].set_title(titles[r] if titles else "image", fontsize=8)
    for c, (name, maps) in enumerate(columns.items(), 1):
      heat = _upsample(maps, size)[r]
      axes[r, c].imshow(gray[r], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
      axes[r, c].imshow(heat, cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="bilinear")
      if r == 0:
        axes[r, c].set_title(name, fontsize=9)
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_similarity(sims: np.ndarray, path: str, title: str = "") -> str:
  """The mean (and per-image range) of [layers, B] cls/dist cosine similarities per layer."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  layers = np.arange(sims.shape[0])
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  ax.fill_between(layers, sims.min(axis=1), sims.max(axis=1), alpha=0.2,
                  label="min-max over images")
  ax.plot(layers, sims.mean(axis=1), "o-", label="mean over images")
  ax.axhline(0.0, color="gray", lw=0.5)
  ax.set_xticks(layers, ["emb"] + [str(i) for i in range(len(layers) - 1)])
  ax.set_xlabel("layer (emb = input embeddings, i = output of block i)")
  ax.set_ylabel("cosine(cls, dist)")
  ax.set_ylim(min(-0.1, float(sims.min()) - 0.05), 1.05)
  ax.set_title(title or "class vs distillation token", fontsize=9)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------------------------
# A checkpoint's pictures.
# ----------------------------------------------------------------------------------------------
def load_deit(checkpoint_dir: str, step: int | None = None):
  """The DeiT of a checkpoint directory (a run's checkpoints/ or a converted one), eval mode;
  VisualizeError for a CNN."""
  from deit_jax import checkpoint, models
  description, step = checkpoint.read_description(checkpoint_dir, step)
  if description.get("family") != "deit":
    raise VisualizeError(
        f"{checkpoint_dir} holds a {description.get('family')} model "
        f"({description.get('name') or description.get('arch') or 'a CNN'}): it has no attention "
        "and no class or distillation token to picture; pass a DeiT checkpoint.")
  model = checkpoint.load_model(checkpoint_dir, step=step)
  if not isinstance(model, models.DeiT):
    raise VisualizeError(f"{checkpoint_dir}: not a DeiT model ({type(model).__name__}).")
  return model


def eval_images(config, input_size: int, num_images: int) -> tuple[np.ndarray, np.ndarray]:
  """The first `num_images` images (normalized NHWC) and labels of the config's eval split,
  through the project's eval pipeline at `input_size`."""
  import ml_collections
  from deit_jax import data, plan
  aug = ml_collections.ConfigDict(config.aug.to_dict())
  aug.input_size = input_size
  source = plan.build_eval_source(config)
  n = min(8 * num_images, source.num_examples)
  batch = next(data.eval_iterator(source, aug, global_batch_size=n, process_index=0,
                                  process_count=1))
  pick = varied_rows(batch["label"][:n], num_images)
  return batch["image"][pick], batch["label"][pick]


def varied_rows(labels: np.ndarray, k: int) -> np.ndarray:
  """k row indices, the first row of each label before any repeat (eval splits are often sorted
  or periodic by class), in order."""
  labels = np.asarray(labels)
  first = np.unique(labels, return_index=True)[1]
  firsts = np.sort(first)[:k]
  rest = np.setdiff1d(np.arange(len(labels)), firsts)[:k - len(firsts)]
  return np.sort(np.concatenate([firsts, rest])).astype(np.int64)


def _forward(model, images):
  import jax
  from flax import nnx
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, return_aux=True, return_attention=True))
  logits, aux = fn(state, images)
  return np.asarray(logits), {k: np.asarray(v) for k, v in aux.items()}


def visualize(checkpoint_dir: str, config, out_dir: str, num_images: int = 6, *,
              step: int | None = None) -> dict:
  """Writes the pictures (module docstring) of a DeiT checkpoint (its latest step, or `step`)
  on `config`'s eval images to `out_dir`; returns what visualize.json holds."""
  if num_images < 1:
    raise VisualizeError(f"--num_images={num_images}: picture at least one image.")
  model = load_deit(checkpoint_dir, step)
  cfg = model.config
  images, labels = eval_images(config, cfg.img_size, num_images)
  logits, aux = _forward(model, images)
  columns = attention_columns(aux, cfg.distilled)
  shown = unnormalize(images, config.aug.mean, config.aug.std)
  preds = logits.argmax(-1)
  titles = [f"label {int(l)}, pred {int(p)}" for l, p in zip(labels, preds)]
  os.makedirs(out_dir, exist_ok=True)
  files = [plot_attention(shown, columns, os.path.join(out_dir, ATTENTION_FILE), titles)]
  result: dict[str, Any] = {"checkpoint": os.path.abspath(checkpoint_dir),
                            "num_images": int(len(images)), "distilled": cfg.distilled,
                            "columns": ["image"] + list(columns), "labels": labels.tolist(),
                            "predictions": preds.tolist()}
  if cfg.distilled:
    sims = token_similarity(aux)
    layers = ["embeddings"] + [f"block{i}" for i in range(sims.shape[0] - 1)]
    result["similarity"] = {"layers": layers, "mean": sims.mean(axis=1).round(4).tolist(),
                            "per_image": sims.T.round(4).tolist(),
                            "paper_deit_b_input_output": list(PAPER_SIMILARITY)}
    files.append(plot_similarity(sims, os.path.join(out_dir, SIMILARITY_FILE),
                                 f"cls vs dist token, mean of {len(images)} eval images"))
  else:
    result["similarity"] = None
    result["note"] = "no distillation token: cls columns only, no similarity plot"
  result["files"] = [os.path.abspath(f) for f in files]
  with open(os.path.join(out_dir, JSON_FILE), "w") as f:
    json.dump(result, f, indent=2)
  result["files"].append(os.path.abspath(os.path.join(out_dir, JSON_FILE)))
  return result


def report(result: Mapping) -> str:
  """What the command prints: where the files went and the similarity numbers."""
  lines = [f"pictures of {result['checkpoint']} on {result['num_images']} eval images:"]
  lines += [f"  {f}" for f in result["files"]]
  sim = result.get("similarity")
  if sim:
    lines.append("cls/dist cosine similarity, mean: " + ", ".join(
        f"{name} {v:.3f}" for name, v in zip(sim["layers"], sim["mean"])))
  else:
    lines.append(f"({result['note']})")
  return "\n".join(lines)


def run_visualize(config, workdir: str, checkpoint_dir: str | None = None,
                  num_images: int = 6, out_dir: str | None = None) -> dict:
  """`launch.py --mode=visualize`: the checkpoint (`run.resolve_checkpoint`: default the
  workdir's) pictured into <workdir>/pictures."""
  from deit_jax import run
  ckpt_dir, step = run.resolve_checkpoint(checkpoint_dir, workdir)
  result = visualize(ckpt_dir, config, out_dir or default_out_dir(ckpt_dir), num_images,
                     step=step)
  print(report(result), flush=True)
  return result


def default_out_dir(checkpoint_dir: str) -> str:
  """<workdir>/pictures for a run's <workdir>/checkpoints (or best), else <dir>_pictures beside
  a converted-weights directory."""
  path = os.path.abspath(checkpoint_dir)
  parent, name = os.path.split(path)
  return os.path.join(parent, "pictures") if name in ("checkpoints", "best") else (
      path + "_pictures")


def _load_config(spec: str):
  """A config file, with an optional `:argument` (as launch.py's --config)."""
  from ml_collections.config_flags import config_flags
  return config_flags.ConfigFileFlagParser("config").parse(spec)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m deit_jax.visualize", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True,
                 help="a run's <workdir>/checkpoints (or the workdir, or a step folder) or a "
                      "converted-weights directory")
  p.add_argument("--config", required=True, help="config whose eval split to use, e.g. "
                 "configs/demo_distill.py:hard")
  p.add_argument("--out", default=None, help="output directory (default: <workdir>/pictures "
                 "for <workdir>/checkpoints, else <checkpoint>_pictures)")
  p.add_argument("--num_images", type=int, default=6)
  args = p.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from deit_jax import run
  try:
    config = _load_config(args.config)
    ckpt_dir, step = run.resolve_checkpoint(args.checkpoint, os.path.dirname(args.checkpoint))
    result = visualize(ckpt_dir, config, args.out or default_out_dir(ckpt_dir), args.num_images,
                       step=step)
  except (VisualizeError, *run.USER_ERRORS) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  print(report(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
