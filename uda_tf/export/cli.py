"""The export command: a versioned SavedModel and TFLite files.

    python -m uda_tf.export --model_dir=D --export_dir=E \
        [--version=N] [--tflite=float32,float16,int8] [--tflite_height=H --tflite_width=W] \
        [--notflite_probabilities] [--representative_steps=K] [--compare_images=M] \
        [--max_pixels=P] [--data_dir=...]

writes, with the EMA weights of the latest checkpoint in D:

  E/N/saved_model.pb, E/N/variables/   TF Serving's layout (the version N is
                                        one above the highest in E by default)
  E/tflite/N/uda_<quantization>_<H>x<W>.tflite, E/tflite/N/report.txt

each folder renamed into place once complete, E/N last.

The signatures are described in `uda_tf.export.saved_model`.
"""

import dataclasses
import os
import sys
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from uda_tf import train
from uda_tf.export import saved_model
from uda_tf.export import tflite as tflite_lib
from uda_tf.export.serving import DEFAULT_MAX_PIXELS

TFLITE_DIR = "tflite"


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

    A version appears only once all its parts are complete: the SavedModel,
    the TFLite files and the report are built in hidden folders of E, then
    renamed into place, E/tflite/N first and E/N (what TF Serving loads) last.
    A failure leaves neither, and no temporary folder.

    Args are the command's flags (see the module docstring); a zero TFLite size
    takes the run's crop size from model_dir/FLAGS.json.

    Returns:
      Output name -> path: "saved_model", each TFLite variant, "report".

    Raises:
      ValueError: naming the flag, file or directory at fault (no checkpoint in
        model_dir, an unknown variant, an existing version, a missing
        --data_dir, ...).
    """
    _check_flags(tflite, tflite_height, tflite_width, representative_steps, max_pixels)
    tflite_root = os.path.join(export_dir, TFLITE_DIR)
    if version is None:  # Above a TFLite folder left without its SavedModel too.
        version = max(saved_model.next_version(export_dir), saved_model.next_version(tflite_root))
    version, path = saved_model.check_version(export_dir, version)
    tflite_path = os.path.join(tflite_root, str(version))
    if tflite and tf.io.gfile.exists(tflite_path):
        raise ValueError(f"{tflite_path} already exists: pass another --version.")
    model = train.load_inference_model(model_dir)
    # Read the data before writing anything: a moved --data_dir fails here.
    inputs = None
    if tflite:
        size = (tflite_height, tflite_width)
        inputs = _tflite_inputs(
            model_dir, data_dir, tflite, size, representative_steps, compare_images
        )
    with saved_model.staging_dir(export_dir, str(version)) as staged:
        saved_model.write_saved_model(model, staged, max_pixels=max_pixels)
        outputs = {"saved_model": path}
        if tflite:
            with saved_model.staging_dir(export_dir, f"{TFLITE_DIR}-{version}") as staged_tflite:
                names = _write_tflite(model, staged_tflite, tflite, tflite_probabilities, inputs)
                tf.io.gfile.makedirs(tflite_root)
                saved_model.publish(staged_tflite, tflite_path)
            outputs.update({k: os.path.join(tflite_path, n) for k, n in names.items()})
        try:
            saved_model.publish(staged, path)  # Last: TF Serving loads E/N from now on.
        except BaseException:
            if tflite:
                tf.io.gfile.rmtree(tflite_path)
            raise
    logging.info("Wrote the SavedModel %s", path)
    return outputs


def _check_flags(tflite, tflite_height, tflite_width, representative_steps, max_pixels) -> None:
    """Raises ValueError naming the first invalid flag."""
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
    if max_pixels < 1:
        raise ValueError(f"--max_pixels={max_pixels} is invalid: expected a positive integer.")


@dataclasses.dataclass(frozen=True)
class _TFLiteInputs:
    """What the TFLite conversion and report read from the run and its data."""

    height: int
    width: int
    calibration: np.ndarray | None
    images: np.ndarray | None
    eval_split: str


def _tflite_inputs(
    model_dir, data_dir, tflite, size, representative_steps, compare_images
) -> _TFLiteInputs:
    """The TFLite size (0: the run's crop), int8 calibration crops and report images."""
    cfg = train.read_config(model_dir)
    if data_dir:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=data_dir))
    height = size[0] or cfg.data.crop_height
    width = size[1] or cfg.data.crop_width
    calibration = images = None
    if "int8" in tflite:
        calibration = tflite_lib.representative_images(
            cfg.data, steps=representative_steps, height=height, width=width
        )
    if compare_images > 0:
        images, _ = tflite_lib.eval_images(
            cfg.data, num_images=compare_images, height=height, width=width
        )
    return _TFLiteInputs(height, width, calibration, images, cfg.data.eval_split)


def _write_tflite(
    model, folder: str, tflite: Sequence[str], probabilities: bool, inputs: _TFLiteInputs
) -> dict[str, str]:
    """Writes the TFLite variants (and the report) to `folder`; returns name -> file name."""
    height, width = inputs.height, inputs.width
    names = {}
    for quantization in tflite:
        content = tflite_lib.convert_tflite(
            model,
            quantization=quantization,
            height=height,
            width=width,
            representative_images=inputs.calibration,
            probabilities=probabilities,
        )
        names[quantization] = f"uda_{quantization}_{height}x{width}.tflite"
        with tf.io.gfile.GFile(os.path.join(folder, names[quantization]), "wb") as f:
            f.write(content)
    if inputs.images is not None:
        files = {q: os.path.join(folder, names[q]) for q in tflite}
        rows = tflite_lib.compare_tflite(model, files, inputs.images)
        table = tflite_lib.format_table(rows)
        names["report"] = "report.txt"
        with tf.io.gfile.GFile(os.path.join(folder, names["report"]), "w") as f:
            f.write(
                f"TFLite variants at {height}x{width}, on {len(inputs.images)} "
                f"{inputs.eval_split} images, 1 CPU thread; agreement = pixels whose "
                f"class equals the Keras model's.\n{table}\n"
            )
        logging.info("TFLite variants:\n%s", table)
    return names


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
