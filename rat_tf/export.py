"""Export a classifier as a TensorFlow SavedModel that serves (and can be attacked) without rat_tf.

The SavedModel has two signatures, both returning ``{"logits": float32 [N, K],
"probabilities": float32 [N, K], "classes": int32 [N]}``:

- ``serving_default``: input ``images``, float32 ``[None, H, W, C]`` in the classifier's pixel
  range (``clip_values``, [0, 1] unless the exported trainer says otherwise);
- ``serving_uint8``: input ``images``, uint8 ``[None, H, W, C]`` (0..255 mapped onto that range).

Both refuse, with an InvalidArgument error that says why, an empty batch and (float32) pixels
that are NaN, infinite or outside the pixel range: a served model never answers for an input
it was not trained on.

Signatures enforce the dtype and, through ``tf.ensure_shape``, the image shape at run time, so a
wrong input fails with an error naming the expected shape. ``logits`` are the classifier's
logits, or the input of its final softmax for a classifier that ends in one. A rat_tf trainer
is exported as the classifier it wraps. Reload with plain
``tf.saved_model.load``; :func:`load_serving_fn` turns a signature into a differentiable
``x -> logits`` callable for the attacks.
"""

from __future__ import annotations

import os
import uuid
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from rat_tf import models, ops

SIGNATURES = ("serving_default", "serving_uint8")
INPUT_NAME = "images"
OUTPUT_KEYS = ("logits", "probabilities", "classes")


class ExportError(RuntimeError):
    """A SavedModel is missing a signature or does not reproduce the classifier's predictions."""


def export_saved_model(classifier: keras.Model, path: str, *, overwrite: bool = False,
                       clip_values: Sequence[float] | None = None) -> str:
    """Write ``classifier`` (or the classifier of a trainer) as a SavedModel with
    ``serving_default`` / ``serving_uint8``.

    ``clip_values``: the pixel range the float signature accepts (default: the trainer's, or
    [0, 1]).

    Written to a temporary sibling directory first and renamed into place, so ``path`` never
    holds a half-written export. An existing ``path`` is replaced only with ``overwrite=True``.
    """
    if clip_values is None:
        clip_values = getattr(classifier, "clip_values", ops.PIXEL_RANGE)
    lo, hi = ops.check_clip_values(clip_values)
    logits_of = models.as_model_fn(classifier)
    classifier = logits_of.classifier
    h, w, c = models.input_image_shape(classifier)
    path = os.fspath(path).rstrip("/")
    if tf.io.gfile.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    spec = [None, h, w, c]

    def _outputs(images):
        logits = logits_of(images)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits),
                "classes": tf.argmax(logits, axis=-1, output_type=tf.int32)}

    def _nonempty(images):
        images = tf.ensure_shape(images, spec)
        with tf.control_dependencies([tf.debugging.assert_positive(
                tf.shape(images)[0], message="images: an empty batch (0 images)")]):
            return tf.identity(images)

    def serving_default(images):
        images = _nonempty(images)
        # Checked in order (NaN first, then the range), each before the model runs.
        images = tf.debugging.assert_all_finite(
            images, message="images contain NaN or infinite values")
        in_range = f"images must be in [{lo:g}, {hi:g}] (float pixels; use serving_uint8 for " \
                   f"0..255 bytes)"
        with tf.control_dependencies([
                tf.debugging.assert_greater_equal(tf.reduce_min(images),
                                                  tf.constant(lo, tf.float32), message=in_range),
                tf.debugging.assert_less_equal(tf.reduce_max(images),
                                               tf.constant(hi, tf.float32), message=in_range)]):
            images = tf.identity(images)
        return _outputs(images)

    def serving_uint8(images):
        return _outputs(lo + tf.cast(_nonempty(images), tf.float32) / 255.0 * (hi - lo))

    archive = keras.export.ExportArchive()
    archive.track(classifier)
    archive.add_endpoint("serving_default", serving_default,
                         input_signature=[tf.TensorSpec(spec, tf.float32, name=INPUT_NAME)])
    archive.add_endpoint("serving_uint8", serving_uint8,
                         input_signature=[tf.TensorSpec(spec, tf.uint8, name=INPUT_NAME)])

    parent = os.path.dirname(path)
    if parent:
        tf.io.gfile.makedirs(parent)
    token = uuid.uuid4().hex[:8]
    tmp = f"{path}.tmp-{token}"
    try:
        archive.write_out(tmp, verbose=False)
        if tf.io.gfile.exists(path):  # overwrite: move the old export aside, then swap
            old = f"{path}.old-{token}"
            tf.io.gfile.rename(path, old)
            tf.io.gfile.rename(tmp, path)
            tf.io.gfile.rmtree(old)
        else:
            tf.io.gfile.rename(tmp, path)
    finally:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.rmtree(tmp)
    logging.info("exported %s (input [None, %d, %d, %d]) to %s", classifier.name, h, w, c, path)
    return path


def _signature(loaded, path: str, signature: str):
    if signature not in loaded.signatures:
        raise ExportError(f"{path}: no signature {signature!r}; it has {sorted(loaded.signatures)}")
    fn = loaded.signatures[signature]
    kwargs = fn.structured_input_signature[1]
    if len(kwargs) != 1:
        raise ExportError(f"{path}: signature {signature!r} takes {sorted(kwargs)}, expected one "
                          f"image input")
    (name, spec), = kwargs.items()
    return fn, name, spec


def load_serving_fn(path: str, signature: str = "serving_default"
                    ) -> Callable[[tf.Tensor], tf.Tensor]:
    """A differentiable ``x -> logits`` callable over a signature of an exported SavedModel.

    Works with plain ``tf.saved_model.load``; float inputs are cast to float32 for
    ``serving_default``; a wrong shape or dtype raises ValueError naming the expected input.
    """
    loaded = tf.saved_model.load(path)
    fn, name, spec = _signature(loaded, path, signature)

    def model_fn(x):
        x = tf.convert_to_tensor(x)
        if x.dtype != spec.dtype:
            if not (x.dtype.is_floating and spec.dtype.is_floating):
                raise ValueError(f"{signature} of {path} expects {spec.dtype.name} images of "
                                 f"shape {spec.shape}, got {x.dtype.name}")
            x = tf.cast(x, spec.dtype)
        if not spec.shape.is_compatible_with(x.shape):
            raise ValueError(f"{signature} of {path} expects images of shape {spec.shape}, got "
                             f"{x.shape}")
        return fn(**{name: x})["logits"]

    model_fn.saved_model = loaded  # keeps the variables alive as long as the callable
    model_fn.input_spec = spec
    return model_fn


def verify_export(path: str, classifier: keras.Model, x: np.ndarray | None = None,
                  atol: float = 1e-5, batch_size: int = 256,
                  clip_values: Sequence[float] | None = None) -> float:
    """Reload ``path`` with plain ``tf.saved_model.load`` and check it reproduces ``classifier``.

    Compares logits of both signatures (float32 on ``x``; uint8 on ``x`` rounded to 256 levels
    of the pixel range) and checks ``classes``/``probabilities``; ``x`` defaults to 64 seeded
    uniform images. Returns the max absolute logit difference; raises :class:`ExportError` if
    it exceeds ``atol``.
    """
    if clip_values is None:
        clip_values = getattr(classifier, "clip_values", ops.PIXEL_RANGE)
    lo, hi = ops.check_clip_values(clip_values)
    logits_of = models.as_model_fn(classifier)
    h, w, c = models.input_image_shape(logits_of.classifier)
    if x is None:
        x = np.random.default_rng(0).uniform(lo, hi, (64, h, w, c))
    x = np.asarray(x, np.float32)
    if x.ndim != 4 or x.shape[1:] != (h, w, c) or len(x) == 0:
        raise ValueError(f"x must be a non-empty batch [N, {h}, {w}, {c}], got {x.shape}")
    ops.check_pixel_range(x, (lo, hi), "x")
    loaded = tf.saved_model.load(path)
    x_u8 = np.round((x - lo) / (hi - lo) * 255.0).astype(np.uint8)
    ref_u8 = lo + x_u8.astype(np.float32) / np.float32(255.0) * np.float32(hi - lo)
    worst = 0.0
    for signature, served_in, ref_in in (("serving_default", x, x),
                                         ("serving_uint8", x_u8, ref_u8)):
        fn, name, _ = _signature(loaded, path, signature)
        for start in range(0, len(x), batch_size):
            out = fn(**{name: tf.constant(served_in[start:start + batch_size])})
            missing = set(OUTPUT_KEYS) - set(out)
            if missing:
                raise ExportError(f"{path}: {signature} lacks outputs {sorted(missing)}")
            logits = out["logits"].numpy()
            ref = np.asarray(logits_of(tf.constant(ref_in[start:start + batch_size])),
                             np.float32)
            if logits.shape != ref.shape or out["logits"].dtype != tf.float32:
                raise ExportError(f"{path}: {signature} logits {out['logits'].dtype.name} "
                                  f"{logits.shape}, classifier gives float32 {ref.shape}")
            diff = float(np.max(np.abs(logits - ref)))
            if not np.isfinite(diff):  # max() would drop a NaN and call the export verified
                raise ExportError(f"{path}: {signature} gives non-finite logits (or the "
                                  f"classifier does)")
            worst = max(worst, diff)
            if not np.array_equal(out["classes"].numpy(), np.argmax(logits, -1)):
                raise ExportError(f"{path}: {signature} classes are not argmax(logits)")
            probs = out["probabilities"].numpy()
            if not np.allclose(probs, tf.nn.softmax(logits).numpy(), atol=1e-6):
                raise ExportError(f"{path}: {signature} probabilities are not softmax(logits)")
    if not worst <= atol:
        raise ExportError(f"{path}: served logits differ from the classifier by up to {worst:.3g} "
                          f"(> atol {atol:g})")
    logging.info("verified %s on %d images: max |logit difference| %.3g", path, len(x), worst)
    return worst
