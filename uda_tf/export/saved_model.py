"""A versioned SavedModel for TF Serving, with the signatures of `serving`.

SavedModel signatures:
  serving_default(images: uint8 [N, H, W, 3], any H and W)
  predict_encoded(image_bytes: string [N], PNG or JPEG files of one size)
both return {"classes": int32 [N, H, W] (trainIds), "probabilities": float32
[N, H, W, K]}; predict_encoded_classes(image_bytes) returns the classes only
(a small REST response for full-size images). The network normalises its
input itself, so all take raw RGB pixels.
"""

import contextlib
import os
import uuid
from collections.abc import Iterator

import keras
import tensorflow as tf
from absl import logging

from uda_tf.export.serving import (
    CLASSES,
    DEFAULT_MAX_PIXELS,
    IMAGE_BYTES,
    IMAGES,
    PREDICT_ENCODED,
    PREDICT_ENCODED_CLASSES,
    SERVING_DEFAULT,
    decode_images,
    serve_images,
)

# Unknown rank, so that a scalar or a nested list meets the check in decode_images.
_IMAGE_BYTES_SPEC = tf.TensorSpec(None, tf.string, name=IMAGE_BYTES)


def next_version(export_dir: str) -> int:
    """One above the highest numeric subdirectory of `export_dir` (1 if none)."""
    if not tf.io.gfile.isdir(export_dir):
        return 1
    versions = [
        int(n.rstrip("/")) for n in tf.io.gfile.listdir(export_dir) if n.rstrip("/").isdigit()
    ]
    return max(versions, default=0) + 1


def check_version(export_dir: str, version: int | None) -> tuple[int, str]:
    """The version to write (default: one above the highest) and its path.

    Raises:
      ValueError: if `version` is not positive, or `export_dir/version`
        already exists.
    """
    if version is None:
        version = next_version(export_dir)
    if version < 1:
        raise ValueError(f"--version={version} is invalid: expected a positive integer.")
    path = os.path.join(export_dir, str(version))
    if tf.io.gfile.exists(path):
        raise ValueError(
            f"{path} already exists: pass another --version, or leave it out to use "
            f"{next_version(export_dir)}."
        )
    return version, path


@contextlib.contextmanager
def staging_dir(parent: str, name: str) -> Iterator[str]:
    """A fresh hidden folder in `parent` in which to build `parent/name`.

    Build there, then `publish` it: a server or reader watching `parent` sees
    either nothing or the complete folder. The folder is removed when the
    block ends, on failure too, unless it was published.
    """
    path = os.path.join(parent, f".tmp-{name}-{uuid.uuid4().hex[:8]}")
    tf.io.gfile.makedirs(path)
    try:
        yield path
    finally:
        if tf.io.gfile.exists(path):
            tf.io.gfile.rmtree(path)


def publish(staged: str, path: str) -> None:
    """Renames the complete folder `staged` to `path` (never over an existing one)."""
    tf.io.gfile.rename(staged, path, overwrite=False)


def write_saved_model(
    model: keras.Model, path: str, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> None:
    """Writes `model` with the signatures of the module docstring to `path`.

    Raises:
      ValueError: if `max_pixels` is not positive.
    """
    if max_pixels < 1:
        raise ValueError(f"--max_pixels={max_pixels} is invalid: expected a positive integer.")
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name=SERVING_DEFAULT,
        fn=lambda images: serve_images(model, images),
        # Unknown rank, so that a wrong rank meets the check in serve_images.
        input_signature=[tf.TensorSpec(None, tf.uint8, name=IMAGES)],
    )
    archive.add_endpoint(
        name=PREDICT_ENCODED,
        fn=lambda image_bytes: serve_images(
            model, decode_images(image_bytes, max_pixels=max_pixels)
        ),
        input_signature=[_IMAGE_BYTES_SPEC],
    )
    archive.add_endpoint(
        name=PREDICT_ENCODED_CLASSES,
        fn=lambda image_bytes: {
            CLASSES: serve_images(model, decode_images(image_bytes, max_pixels=max_pixels))[CLASSES]
        },
        input_signature=[_IMAGE_BYTES_SPEC],
    )
    archive.write_out(path, verbose=False)


def export_saved_model(
    model: keras.Model,
    export_dir: str,
    *,
    version: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> str:
    """Writes `model` as version `version` of a TF Serving model.

    The SavedModel is written beside the target and renamed into place, so that
    a server watching `export_dir` never loads a half-written version; a
    failure leaves no version and no temporary folder.

    Args:
      model: network mapping float32 pixels [N, H, W, 3] in [0, 255] to logits
        [N, H, W, K], with the weights to serve (the EMA ones).
      export_dir: the model's base path (what TF Serving's --model_base_path or
        the container's /models/<name> points to).
      version: positive integer; default: one above the highest present.
      max_pixels: the largest height * width `predict_encoded` decodes.

    Returns:
      The path of the version directory, `export_dir/version`.

    Raises:
      ValueError: if `version` or `max_pixels` is not positive, or
        `export_dir/version` already exists.
    """
    version, path = check_version(export_dir, version)
    if max_pixels < 1:
        raise ValueError(f"--max_pixels={max_pixels} is invalid: expected a positive integer.")
    with staging_dir(export_dir, str(version)) as staged:
        write_saved_model(model, staged, max_pixels=max_pixels)
        publish(staged, path)
    logging.info("Wrote the SavedModel %s", path)
    return path
