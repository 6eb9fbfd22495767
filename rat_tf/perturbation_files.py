"""Perturbation files: V with its metadata in one ``.npz``, one schema for every writer and reader.

A file holds ``perturbations`` (float32 V: [K,H,W,C] per target, [K,K,H,W,C] per (source,
target), or one [H,W,C]) and ``meta``, a JSON string with at least ``eps`` (the radius of V)
and ``norm_type`` ("linf" or "l2"), and ``search_fingerprints`` (16-hex-digit fingerprints of
the images V was searched on, :func:`rat_tf.data.fingerprints`) when known. Files are written
atomically and read with ``allow_pickle=False``; :func:`load` checks V against its radius and,
when asked, against the image shape and number of classes of its user.
"""

from __future__ import annotations

import json
import os
import re
from typing import Sequence

import numpy as np

from rat_tf import data, files, ops

FINGERPRINT_KEY = "search_fingerprints"  # the images V was searched on
_FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")


def check_bound(V, eps: float, norm: str = "linf", what: str = "perturbations") -> None:
    """Raise ValueError unless V is finite and every slice (rows along axis 0) has norm <= eps."""
    V = np.asarray(V, np.float32)
    if not np.all(np.isfinite(V)):
        raise ValueError(f"{what} contain NaN or infinite values")
    flat = V.reshape((-1,) + V.shape[-3:]) if V.ndim >= 4 else V[None]
    worst = float(np.max(ops.batch_norms(flat, norm))) if flat.size else 0.0
    if worst > float(eps) * (1 + 1e-5) + 1e-7:
        raise ValueError(f"{what} have {ops.check_norm(norm)} norm up to {worst:.4g}, outside "
                         f"their radius eps {float(eps):g}")


def _check_shape(V: np.ndarray, what: str) -> None:
    if V.ndim not in (3, 4, 5):
        raise ValueError(f"{what} must be [H,W,C], [K,H,W,C] or per source [K,K,H,W,C], got "
                         f"shape {V.shape}")


def save(path: str, V, *, eps: float, norm: str = "linf",
         search_images: np.ndarray | None = None, **meta) -> str:
    """Save V (within ``eps`` under ``norm``) and its metadata atomically; returns the path.

    ``search_images``: the images V was searched on; their fingerprints are stored so that an
    evaluation can refuse to measure V on them. Other keyword metadata must be JSON-ready.
    """
    V = np.asarray(V, np.float32)
    _check_shape(V, "perturbations")
    ops.check_radius(eps)
    norm = ops.check_norm(norm)
    check_bound(V, eps, norm)
    for key in ("norm", "norm_type"):
        if key in meta:
            raise ValueError(f"pass the norm as norm=, not as metadata {key!r}")
    meta = {**meta, "eps": float(eps), "norm_type": norm}
    if search_images is not None:
        meta[FINGERPRINT_KEY] = data.fingerprints(search_images).tolist()
    path = path if path.endswith(".npz") else path + ".npz"
    text = np.array(json.dumps(meta, default=files.jsonable))
    return files.atomic_write(path, lambda p: np.savez(p, perturbations=V, meta=text), ".npz")


def load(path: str, *, image_shape: Sequence[int] | None = None,
         num_classes: int | None = None) -> tuple[np.ndarray, dict]:
    """(V, metadata) of a file written by :func:`save`, validated.

    Refused: not an ``.npz`` of this schema, V outside the radius it states, malformed
    fingerprints and, when given, V of another image shape or number of classes.
    """
    try:
        f = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        kind = "no such file" if isinstance(e, FileNotFoundError) else "not a readable .npz file"
        raise ValueError(f"perturbations file {path}: {kind} (rat_tf writes V as .npz with "
                         f"bin/perturb.py or bin/train.py --method=rat)") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"perturbations file {path}: a bare array, not an .npz archive with "
                         f"'perturbations' and 'meta'")
    with f:
        if "perturbations" not in f.files:
            raise ValueError(f"perturbations file {path} holds no 'perturbations' array (keys: "
                             f"{f.files})")
        try:
            meta = json.loads(str(f["meta"])) if "meta" in f.files else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"perturbations file {path}: its metadata is not JSON ({e})") \
                from None
        V = f["perturbations"].astype(np.float32)
    if not isinstance(meta, dict):
        raise ValueError(f"perturbations file {path}: its metadata is not a JSON object")
    what = f"the perturbations in {path}"
    _check_shape(V, what)
    if "norm_type" not in meta and isinstance(meta.get("norm"), str):
        meta["norm_type"] = meta.pop("norm")  # the key of files written before the schema
    if meta.get("eps") is not None:
        check_bound(V, meta["eps"], meta.get("norm_type", "linf"), what=what)
    elif not np.all(np.isfinite(V)):
        raise ValueError(f"{what} contain NaN or infinite values")
    prints = meta.get(FINGERPRINT_KEY)
    if prints is not None and (not isinstance(prints, list) or not all(
            isinstance(p, str) and _FINGERPRINT.match(p) for p in prints)):
        raise ValueError(f"perturbations file {path}: {FINGERPRINT_KEY} must be a list of "
                         f"16-hex-digit image fingerprints")
    if image_shape is not None and V.shape[-3:] != tuple(image_shape):
        raise ValueError(f"{what} are for images {V.shape[-3:]}, not {tuple(image_shape)}")
    if num_classes is not None and V.ndim >= 4 and V.shape[:V.ndim - 3] != (
            (num_classes,) * (V.ndim - 3)):
        raise ValueError(f"{what} of shape {V.shape} do not hold one perturbation per class "
                         f"of {num_classes} classes")
    return V, meta


def write_search(out_dir: str, V, stats: dict, search_images: np.ndarray, *,
                 class_names: Sequence[str], settings: dict | None = None,
                 success_test: Sequence[float | None] | None = None,
                 num_test_images: int = 0) -> dict:
    """Write a search's outputs to ``out_dir``: search.json, perturbations.png, then the npz.

    ``stats`` is what :func:`rat_tf.attacks.targeted_universal` returned; ``success_test`` the
    per-target success on held-out images, if measured. The npz (with the search images'
    fingerprints, so evaluation refuses them) is written last: its presence marks the search
    as done. Returns the JSON report.
    """
    from rat_tf import plots  # matplotlib only where figures are written

    searched = [t for t, r in enumerate(stats["success_rate"]) if r is not None]
    settings = {**(settings or {}), **{k: stats[k] for k in (
        "method", "eps", "norm_type", "delta", "step_size", "targets")}}
    report = {
        "settings": settings,
        "success_search": stats["success_rate"],
        "mean_success_search": float(np.mean([stats["success_rate"][t] for t in searched])),
        "success_test": None if success_test is None else list(success_test),
        "mean_success_test": None if success_test is None else float(
            np.mean([success_test[t] for t in searched])),
        "norm": stats["norm"], "passes": stats["passes"], "converged": stats["converged"],
        "num_search_images": int(len(search_images)), "num_test_images": int(num_test_images),
        "num_replicas": stats["num_replicas"], "wall_seconds": stats["seconds"],
    }
    os.makedirs(out_dir, exist_ok=True)
    files.write_json(os.path.join(out_dir, "search.json"), report)
    shown = success_test if success_test is not None else stats["success_rate"]
    titles = [f"{n}\n{'-' if r is None else f'{100 * r:.0f}%'}" for n, r in zip(class_names, shown)]
    per_source = np.ndim(V) == 5  # rows: source classes, columns: targets
    plots.perturbation_grid(list(V) if per_source else V,
                            os.path.join(out_dir, "perturbations.png"), titles=titles,
                            row_labels=[f"from {n}" for n in class_names] if per_source else ["V"],
                            dpi=64 if per_source else 80)
    meta = {k: v for k, v in settings.items() if k not in ("eps", "norm_type")}
    save(os.path.join(out_dir, "perturbations.npz"), V, eps=settings["eps"],
         norm=settings["norm_type"], search_images=search_images, **meta,
         mean_success_rate=report["mean_success_search"], success_test=report["success_test"])
    return report
