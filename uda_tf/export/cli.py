"""The export command: a versioned SavedModel and TFLite files.

    python -m uda_tf.export --model_dir=D --export_dir=E \
        [--version=N] [--tflite=float32,float16,int8] [--tflite_height=H --tflite_width=W] \
        [--notflite_probabilities] [--representative_steps=K] [--compare_images=M] \
        [--max_pixels=P] [--data_dir=...]

writes, with the EMA weights of the latest checkpoint in D:

  E/N/saved_model.pb, E/N/variables/   TF Serving's layout (the version N is
                                        one above the highest in E by default)
  E/tflite/N/uda_<quantization>_<H>x<W>.tflite, E/tflite/N/report.txt

The signatures are described in `uda_tf.export.saved_model`.
"""

import dataclasses
import os
import sys
from collections.abc import Sequence

import tensorflow as tf
from absl import app, flags, logging

from uda_tf import train
from uda_tf.export import tflite as tflite_lib
from uda_tf.export.saved_model import export_saved_model
from uda_tf.export.serving import DEFAULT_MAX_PIXELS


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
    for quantization in tflite:
        tflite_lib.check_quantization(quantization)
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
        calibration = tflite_lib.representative_images(
            cfg.data, steps=representative_steps, height=height, width=width
        )
    tflite_dir = os.path.join(export_dir, "tflite", os.path.basename(outputs["saved_model"]))
    tf.io.gfile.makedirs(tflite_dir)
    for quantization in tflite:
        content = tflite_lib.convert_tflite(
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
        images, _ = tflite_lib.eval_images(
            cfg.data, num_images=compare_images, height=height, width=width
        )
        rows = tflite_lib.compare_tflite(model, {q: outputs[q] for q in tflite}, images)
        outputs["report"] = os.path.join(tflite_dir, "report.txt")
        table = tflite_lib.format_table(rows)
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
