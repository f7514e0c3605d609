"""Exports a trained network for serving: a versioned SavedModel and TFLite files.

    python -m uda_tf.export --model_dir=D --export_dir=E \
        [--version=N] [--tflite=float32,float16,int8] [--tflite_height=H --tflite_width=W] \
        [--notflite_probabilities] [--representative_steps=K] [--compare_images=M] \
        [--max_pixels=P] [--data_dir=...]

writes, with the EMA weights of the latest checkpoint in D:

  E/N/saved_model.pb, E/N/variables/   TF Serving's layout (the version N is
                                        one above the highest in E by default)
  E/tflite/N/uda_<quantization>_<H>x<W>.tflite, E/tflite/N/report.txt

SavedModel signatures:
  serving_default(images: uint8 [N, H, W, 3], any H and W)
  predict_encoded(image_bytes: string [N], PNG or JPEG files of one size)
both return {"classes": int32 [N, H, W] (trainIds), "probabilities": float32
[N, H, W, K]}; predict_encoded_classes(image_bytes) returns the classes only
(a small REST response for full-size images). The network normalises its
input itself, so all take raw RGB pixels. Every input check is in the graph, so that TF Serving, the
SavedModel CLI and Python report the same message.
"""

import dataclasses
import os
import sys
from collections.abc import Sequence

import keras
import tensorflow as tf
from absl import app, flags, logging

SERVING_DEFAULT = "serving_default"
PREDICT_ENCODED = "predict_encoded"
PREDICT_ENCODED_CLASSES = "predict_encoded_classes"
IMAGES = "images"
IMAGE_BYTES = "image_bytes"
CLASSES = "classes"
PROBABILITIES = "probabilities"

# Largest encoded image that predict_encoded decodes: 2^25 pixels (e.g.
# 8192 x 4096, sixteen Cityscapes frames), 100 MB once decoded to RGB.
DEFAULT_MAX_PIXELS = 1 << 25

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8\xff"
# Signature (8) + IHDR length (4) + "IHDR" (4) + width (4) + height (4).
_PNG_HEADER_BYTES = 24


def serve_images(model: keras.Model, images: tf.Tensor) -> dict[str, tf.Tensor]:
    """Runs the network on raw pixels, after checking their shape in the graph.

    Args:
      model: network mapping float32 pixels [N, H, W, 3] in [0, 255] to
        logits [N, H, W, K].
      images: uint8 [N, H, W, 3], N, H, W >= 1; the rank need not be known
        when tracing.

    Returns:
      {"classes": int32 [N, H, W], "probabilities": float32 [N, H, W, K]}.

    Raises:
      tf.errors.InvalidArgumentError: (when run) on another rank, a channel
        count other than 3 or an empty batch or image; the message names the
        expected shape and the one received.
    """
    shape = tf.shape(images)
    padded = tf.concat([shape, tf.zeros([4], tf.int32)], axis=0)
    ok = tf.logical_and(tf.equal(tf.size(shape), 4), tf.equal(padded[3], 3))
    ok = tf.logical_and(ok, tf.reduce_min(padded[:3]) >= 1)
    check = tf.debugging.Assert(
        ok,
        [
            (
                f"{SERVING_DEFAULT}: expected {IMAGES} as uint8 [N, H, W, 3] "
                "(RGB, N, H, W >= 1), got a tensor of shape"
            ),
            shape,
        ],
        summarize=8,
    )
    with tf.control_dependencies([check]):
        images = tf.ensure_shape(tf.identity(images), [None, None, None, 3])
    logits = tf.cast(model(tf.cast(images, tf.float32), training=False), tf.float32)
    return {
        CLASSES: tf.argmax(logits, axis=-1, output_type=tf.int32),
        PROBABILITIES: tf.nn.softmax(logits, axis=-1),
    }


def _png_size(data: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
    """Height and width from a PNG's IHDR chunk: int64 [2]."""
    padded = tf.strings.join([data, b"\0" * _PNG_HEADER_BYTES])
    header = tf.io.decode_raw(tf.strings.substr(padded, 12, 12), tf.uint8)
    is_ihdr = tf.logical_and(
        tf.strings.length(data) >= _PNG_HEADER_BYTES,
        tf.equal(tf.strings.substr(data, 12, 4), b"IHDR"),
    )
    check = tf.debugging.Assert(
        is_ihdr,
        [
            f"{PREDICT_ENCODED}: {IMAGE_BYTES}[i] is a truncated or corrupt PNG (no IHDR); i =",
            index,
        ],
    )
    powers = tf.constant([1 << 24, 1 << 16, 1 << 8, 1], tf.int64)
    with tf.control_dependencies([check]):
        big_endian = tf.reshape(tf.cast(header[4:], tf.int64), [2, 4])
    width_height = tf.reduce_sum(big_endian * powers, axis=1)
    return tf.reverse(width_height, axis=[0])


def encoded_image_size(data: tf.Tensor, index: tf.Tensor | int = 0) -> tf.Tensor:
    """Reads (height, width) from a PNG or JPEG header, without decoding it.

    Args:
      data: string [], the bytes of one file.
      index: int [], its position in the request, for the error messages.

    Returns:
      int64 [2]: height, width.

    Raises:
      tf.errors.InvalidArgumentError: (when run) if the bytes start with
        neither the PNG nor the JPEG signature, or the header is cut short.
    """
    index = tf.cast(index, tf.int64)
    is_png = tf.equal(tf.strings.substr(data, 0, len(_PNG_SIGNATURE)), _PNG_SIGNATURE)
    is_jpeg = tf.equal(tf.strings.substr(data, 0, len(_JPEG_SOI)), _JPEG_SOI)
    check = tf.debugging.Assert(
        tf.logical_or(is_png, is_jpeg),
        [
            (
                f"{PREDICT_ENCODED}: {IMAGE_BYTES}[i] is neither a PNG nor a JPEG file "
                "(bad signature); i ="
            ),
            index,
            "its first bytes:",
            tf.strings.substr(data, 0, 8),
        ],
    )
    with tf.control_dependencies([check]):
        return tf.cond(
            is_jpeg,
            lambda: tf.cast(tf.image.extract_jpeg_shape(data)[:2], tf.int64),
            lambda: _png_size(data, index),
        )


def decode_images(image_bytes: tf.Tensor, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tf.Tensor:
    """Decodes a batch of PNG/JPEG files of one size, refusing oversized ones.

    The sizes are read from the headers and checked before anything is
    decoded, so that a small file declaring a huge image (a decompression bomb)
    costs nothing.

    Args:
      image_bytes: string [N], N >= 1, PNG or JPEG files (grey, RGB or RGBA;
        8 or 16 bits) that all have the same height and width.
      max_pixels: the largest height * width accepted.

    Returns:
      uint8 [N, H, W, 3] RGB.

    Raises:
      tf.errors.InvalidArgumentError: (when run) naming the image and the
        problem: not PNG/JPEG, a truncated header, more than `max_pixels`
        pixels, sizes that differ within the batch, or undecodable data.
    """
    image_bytes = tf.reshape(image_bytes, [-1])
    num_images = tf.size(image_bytes, out_type=tf.int64)
    sizes = tf.map_fn(
        lambda args: encoded_image_size(*args),
        (image_bytes, tf.range(num_images)),
        fn_output_signature=tf.TensorSpec([2], tf.int64),
    )  # [N, 2]
    pixels = tf.reduce_prod(sizes, axis=1)  # [N]
    checks = [
        tf.debugging.Assert(num_images >= 1, [f"{PREDICT_ENCODED}: {IMAGE_BYTES} holds no image"]),
        tf.debugging.Assert(
            tf.reduce_all(pixels <= max_pixels),
            [
                (
                    f"{PREDICT_ENCODED}: an image is larger than --max_pixels={max_pixels} "
                    "(height * width); refused before decoding. Sizes [height, width]:"
                ),
                sizes,
            ],
            summarize=16,
        ),
        tf.debugging.Assert(
            tf.reduce_all(pixels >= 1),
            [f"{PREDICT_ENCODED}: an image header declares 0 pixels. Sizes:", sizes],
        ),
        tf.debugging.Assert(
            tf.reduce_all(tf.equal(sizes, sizes[:1])),
            [
                (
                    f"{PREDICT_ENCODED}: the images of one request must have the same size; "
                    "send differently sized images in separate requests. Sizes [height, width]:"
                ),
                sizes,
            ],
            summarize=16,
        ),
    ]
    with tf.control_dependencies(checks):
        image_bytes = tf.identity(image_bytes)
    images = tf.map_fn(
        lambda data: tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False),
        image_bytes,
        fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8),
    )
    return tf.ensure_shape(images, [None, None, None, 3])


def next_version(export_dir: str) -> int:
    """One above the highest numeric subdirectory of `export_dir` (1 if none)."""
    if not tf.io.gfile.isdir(export_dir):
        return 1
    versions = [
        int(n.rstrip("/")) for n in tf.io.gfile.listdir(export_dir) if n.rstrip("/").isdigit()
    ]
    return max(versions, default=0) + 1


def export_saved_model(
    model: keras.Model,
    export_dir: str,
    *,
    version: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> str:
    """Writes `model` as version `version` of a TF Serving model.

    The SavedModel is written beside the target and renamed into place, so that
    a server watching `export_dir` never loads a half-written version.

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
    if version is None:
        version = next_version(export_dir)
    if version < 1:
        raise ValueError(f"--version={version} is invalid: expected a positive integer.")
    if max_pixels < 1:
        raise ValueError(f"--max_pixels={max_pixels} is invalid: expected a positive integer.")
    path = os.path.join(export_dir, str(version))
    if tf.io.gfile.exists(path):
        raise ValueError(
            f"{path} already exists: pass another --version, or leave it out to use "
            f"{next_version(export_dir)}."
        )
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
        input_signature=[tf.TensorSpec([None], tf.string, name=IMAGE_BYTES)],
    )
    archive.add_endpoint(
        name=PREDICT_ENCODED_CLASSES,
        fn=lambda image_bytes: {
            CLASSES: serve_images(model, decode_images(image_bytes, max_pixels=max_pixels))[CLASSES]
        },
        input_signature=[tf.TensorSpec([None], tf.string, name=IMAGE_BYTES)],
    )
    tmp_path = os.path.join(export_dir, f".tmp-{version}")
    if tf.io.gfile.exists(tmp_path):
        tf.io.gfile.rmtree(tmp_path)
    tf.io.gfile.makedirs(export_dir)
    archive.write_out(tmp_path, verbose=False)
    tf.io.gfile.rename(tmp_path, path)
    logging.info("Wrote the SavedModel %s", path)
    return path


def export_model_dir(
    model_dir: str,
    export_dir: str,
    *,
    version: int | None = None,
    tflite: Sequence[str] = ("float32", "float16", "int8"),
    tflite_height: int = 0,
    tflite_width: int = 0,
    tflite_probabilities: bool = True,
    representative_steps: int = 4,
    compare_images: int = 8,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    data_dir: str | None = None,
) -> dict[str, str]:
    """The export command: SavedModel, then TFLite variants and their report.

    Args are the command's flags (see the module docstring); a zero TFLite size
    takes the run's crop size from model_dir/FLAGS.json.

    Returns:
      Output name -> path: "saved_model", each TFLite variant, "report".

    Raises:
      ValueError: naming the flag, file or directory at fault (no checkpoint in
        model_dir, an unknown variant, an existing version, ...).
    """
    from uda_tf import export_tflite, train  # Lazy: export_tflite imports this module.

    for quantization in tflite:
        export_tflite.check_quantization(quantization)
    if min(tflite_height, tflite_width) < 0:
        raise ValueError(
            f"--tflite_height={tflite_height}, --tflite_width={tflite_width} are invalid: "
            "expected >= 1, or 0 for the run's crop size."
        )
    if representative_steps < 1:
        raise ValueError(
            f"--representative_steps={representative_steps} is invalid: expected >= 1."
        )
    model = train.load_inference_model(model_dir)
    outputs = {
        "saved_model": export_saved_model(model, export_dir, version=version, max_pixels=max_pixels)
    }
    if not tflite:
        return outputs
    cfg = train.read_config(model_dir)
    if data_dir:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=data_dir))
    height = tflite_height or cfg.data.crop_height
    width = tflite_width or cfg.data.crop_width
    calibration = None
    if "int8" in tflite:
        calibration = export_tflite.representative_images(
            cfg.data, steps=representative_steps, height=height, width=width
        )
    tflite_dir = os.path.join(export_dir, "tflite", os.path.basename(outputs["saved_model"]))
    tf.io.gfile.makedirs(tflite_dir)
    for quantization in tflite:
        content = export_tflite.convert_tflite(
            model,
            quantization=quantization,
            height=height,
            width=width,
            representative_images=calibration,
            probabilities=tflite_probabilities,
        )
        path = os.path.join(tflite_dir, f"uda_{quantization}_{height}x{width}.tflite")
        with tf.io.gfile.GFile(path, "wb") as f:
            f.write(content)
        outputs[quantization] = path
    if compare_images > 0:
        images, _ = export_tflite.eval_images(
            cfg.data, num_images=compare_images, height=height, width=width
        )
        rows = export_tflite.compare_tflite(model, {q: outputs[q] for q in tflite}, images)
        outputs["report"] = os.path.join(tflite_dir, "report.txt")
        table = export_tflite.format_table(rows)
        with tf.io.gfile.GFile(outputs["report"], "w") as f:
            f.write(
                f"TFLite variants at {height}x{width}, on {len(images)} "
                f"{cfg.data.eval_split} images, 1 CPU thread; agreement = pixels whose "
                f"class equals the Keras model's.\n{table}\n"
            )
        logging.info("TFLite variants:\n%s", table)
    return outputs


def define_flags() -> None:
    """The command's flags (called by __main__ only)."""
    flags.DEFINE_string("model_dir", None, "Training directory: FLAGS.json and checkpoints.")
    flags.DEFINE_string("export_dir", None, "Base path of the served model (versions inside).")
    flags.DEFINE_integer("version", None, "SavedModel version; default: one above the highest.")
    flags.DEFINE_list(
        "tflite", ["float32", "float16", "int8"], "TFLite variants to write; empty for none."
    )
    flags.DEFINE_integer("tflite_height", 0, "TFLite input height; 0: the run's --crop_height.")
    flags.DEFINE_integer("tflite_width", 0, "TFLite input width; 0: the run's --crop_width.")
    flags.DEFINE_bool(
        "tflite_probabilities",
        True,
        "TFLite outputs the probabilities beside the classes; false: classes only (faster).",
    )
    flags.DEFINE_integer("representative_steps", 4, "Training batches calibrating int8.")
    flags.DEFINE_integer(
        "compare_images", 8, "Eval images for the TFLite report (latency, agreement); 0: none."
    )
    flags.DEFINE_integer("max_pixels", DEFAULT_MAX_PIXELS, "predict_encoded's pixel limit.")
    flags.DEFINE_string("data_dir", None, "Overrides FLAGS.json's --data_dir (int8, report).")
    flags.mark_flags_as_required(["model_dir", "export_dir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    values = flags.FLAGS
    try:
        outputs = export_model_dir(
            values.model_dir,
            values.export_dir,
            version=values.version,
            tflite=values.tflite,
            tflite_height=values.tflite_height,
            tflite_width=values.tflite_width,
            tflite_probabilities=values.tflite_probabilities,
            representative_steps=values.representative_steps,
            compare_images=values.compare_images,
            max_pixels=values.max_pixels,
            data_dir=values.data_dir,
        )
    except ValueError as error:
        sys.exit(f"uda_tf.export: error: {error}")
    for name, path in outputs.items():
        logging.info("%s: %s", name, path)


if __name__ == "__main__":
    define_flags()
    app.run(main)
