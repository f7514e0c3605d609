"""TFLite variants of the network (float32, float16, int8) and LiteRT inference.

Every variant has one fixed input size and the same signature as the
SavedModel's serving_default, for one image:
  images:        uint8   [1, H, W, 3]  raw RGB pixels (no normalisation)
  classes:       int32   [1, H, W]     trainIds (argmax of the logits)
  probabilities: float32 [1, H, W, K]  softmax (left out with
                                       probabilities=False)
The softmax and its float output cost about as much as a small network
(in int8 more than the network itself): a phone app that needs the classes
only is faster without them.

float16 stores the weights in float16 and computes in float32. int8 is a full
integer model calibrated on training images: the uint8 input is cast and
quantized inside, every op runs in int8, and the probabilities are
dequantized at the end (a resolution of 1/256); the classes are the argmax of
the int8 logits.

Conversion path (TF 2.21, Keras 3): a fixed-size keras.export.ExportArchive
SavedModel, then tf.lite.TFLiteConverter.from_saved_model. Converting
concrete functions of a Keras 3 model directly keeps its variables as
uninitialized TFLite resource variables, which gives wrong outputs.
"""

import dataclasses
import os
import tempfile
import time
import warnings
from collections.abc import Iterable

import keras
import numpy as np
import tensorflow as tf

from uda_tf import common
from uda_tf import config as config_lib
from uda_tf.data import streams
from uda_tf.export import serving

QUANTIZATIONS = ("float32", "float16", "int8")
SIGNATURE_KEY = serving.SERVING_DEFAULT


def check_quantization(quantization: str) -> None:
    """Raises ValueError naming --tflite unless `quantization` is a known variant."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"--tflite={quantization!r} is invalid: expected one of {QUANTIZATIONS}.")


def convert_tflite(
    model: keras.Model,
    *,
    quantization: str,
    height: int,
    width: int,
    representative_images: Iterable[np.ndarray] | None = None,
    probabilities: bool = True,
) -> bytes:
    """Converts `model` to a TFLite flatbuffer with a fixed input size.

    Args:
      model: network mapping float32 pixels [N, H, W, 3] in [0, 255] to logits
        [N, H, W, K].
      quantization: "float32", "float16" or "int8".
      height: input height of the TFLite model.
      width: input width of the TFLite model.
      representative_images: int8 only, uint8 [height, width, 3] images
        (or [1, height, width, 3]) to calibrate the activation ranges; a
        hundred or so training crops.
      probabilities: whether to output the probabilities beside the classes.

    Returns:
      The .tflite file's bytes.

    Raises:
      ValueError: on an unknown quantization, a size below 1, or int8 without
        representative images (or with ones of another size).
    """
    check_quantization(quantization)
    if height < 1 or width < 1:
        raise ValueError(
            f"--tflite_height={height} / --tflite_width={width} are invalid: expected >= 1."
        )
    calibration = None
    if quantization == "int8":
        calibration = _calibration_images(representative_images, height, width)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name=SIGNATURE_KEY,
        fn=lambda images: _outputs(serving.serve_images(model, images), probabilities),
        input_signature=[tf.TensorSpec([1, height, width, 3], tf.uint8, name=serving.IMAGES)],
    )
    with tempfile.TemporaryDirectory() as tmp_dir:
        archive.write_out(tmp_dir, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp_dir)
        if quantization == "float16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        elif quantization == "int8":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.representative_dataset = lambda: ({serving.IMAGES: x} for x in calibration)
        with warnings.catch_warnings():
            # The calibrator still instantiates the deprecated tf.lite.Interpreter.
            warnings.simplefilter("ignore", UserWarning)
            return converter.convert()


def _outputs(outputs: dict[str, tf.Tensor], probabilities: bool) -> dict[str, tf.Tensor]:
    if probabilities:
        return outputs
    return {serving.CLASSES: outputs[serving.CLASSES]}


def _calibration_images(
    images: Iterable[np.ndarray] | None, height: int, width: int
) -> list[np.ndarray]:
    """Checks the int8 calibration images; returns them as uint8 [1, H, W, 3]."""
    if images is None:
        raise ValueError("int8 TFLite needs representative_images (training crops).")
    batches = []
    for image in images:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.shape not in (
            (height, width, 3),
            (1, height, width, 3),
        ):
            raise ValueError(
                f"A representative image is {image.dtype} {image.shape}: expected uint8 "
                f"[{height}, {width}, 3] (--tflite_height, --tflite_width)."
            )
        batches.append(image.reshape(1, height, width, 3))
    if not batches:
        raise ValueError("int8 TFLite needs at least one representative image.")
    return batches


def load_tflite(tflite_model: bytes | str | os.PathLike, *, num_threads: int | None = None):
    """A LiteRT interpreter for a .tflite file (path) or flatbuffer (bytes)."""
    from ai_edge_litert.interpreter import Interpreter  # Optional dependency.

    if isinstance(tflite_model, (bytes, bytearray)):
        return Interpreter(model_content=bytes(tflite_model), num_threads=num_threads)
    tflite_model = os.fspath(tflite_model)
    if not os.path.exists(tflite_model):
        raise ValueError(f"TFLite file {tflite_model} does not exist.")
    return Interpreter(model_path=tflite_model, num_threads=num_threads)


def run_tflite(
    tflite_model, images: np.ndarray, *, num_threads: int | None = None
) -> dict[str, np.ndarray]:
    """Runs a TFLite variant on a batch, one image at a time.

    Args:
      tflite_model: .tflite bytes, a path, or an interpreter from load_tflite.
      images: uint8 [N, H, W, 3], at the model's input size.
      num_threads: CPU threads of the interpreter (when not given one).

    Returns:
      {"classes": int32 [N, H, W], "probabilities": float32 [N, H, W, K]}
      (the latter if the model has it).

    Raises:
      ValueError: if the images are not uint8 [N, H, W, 3] at the model's size.
    """
    interpreter = tflite_model
    if isinstance(tflite_model, (bytes, bytearray, str, os.PathLike)):
        interpreter = load_tflite(tflite_model, num_threads=num_threads)
    runner = interpreter.get_signature_runner(SIGNATURE_KEY)
    expected = tuple(runner.get_input_details()[serving.IMAGES]["shape"][1:])
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(
            f"TFLite input: expected uint8 images [N, {expected[0]}, {expected[1]}, 3], "
            f"got {images.dtype} {images.shape}."
        )
    outputs = [runner(**{serving.IMAGES: image[None]}) for image in images]
    return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}


def tflite_latency(interpreter, image: np.ndarray, *, repeats: int = 5) -> float:
    """Best seconds of `repeats` invocations on uint8 [H, W, 3], after a warm-up run.

    The best rather than the median: on a shared machine it is the one that
    other processes inflate least.
    """
    runner = interpreter.get_signature_runner(SIGNATURE_KEY)
    runner(**{serving.IMAGES: image[None]})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner(**{serving.IMAGES: image[None]})
        times.append(time.perf_counter() - start)
    return float(np.min(times))


def resize_images(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resizes uint8 [N, h, w, 3] to uint8 [N, height, width, 3] (antialiased bilinear)."""
    images = np.asarray(images)
    if images.shape[1:3] == (height, width):
        return images.astype(np.uint8)
    resized = tf.image.resize(images, [height, width], antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8).numpy()


def resize_masks(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resizes uint8 [N, h, w] label maps to [N, height, width] (nearest)."""
    masks = np.asarray(masks)
    if masks.shape[1:3] == (height, width):
        return masks
    resized = tf.image.resize(masks[..., None], [height, width], method="nearest")
    return resized.numpy()[..., 0].astype(masks.dtype)


def compare_tflite(
    model: keras.Model,
    tflite_models: dict[str, bytes | str],
    images: np.ndarray,
    *,
    num_threads: int | None = 1,
) -> list[dict[str, float | str]]:
    """Size, CPU latency and argmax agreement with `model` of each TFLite variant.

    Args:
      model: the Keras network the variants were converted from.
      tflite_models: variant name -> .tflite bytes or path.
      images: uint8 [N, H, W, 3] at the variants' input size, N >= 1.
      num_threads: interpreter threads for the latency.

    Returns:
      One dict per variant: name, size_mb, latency_ms (best of 5, one image),
      agreement (fraction of pixels whose class equals the Keras model's).
    """
    keras_classes = np.argmax(model.predict(images.astype(np.float32), verbose=0), axis=-1)
    rows = []
    for name, tflite_model in tflite_models.items():
        size = (
            len(tflite_model) if isinstance(tflite_model, bytes) else os.path.getsize(tflite_model)
        )
        interpreter = load_tflite(tflite_model, num_threads=num_threads)
        classes = run_tflite(interpreter, images)[serving.CLASSES]
        rows.append(
            {
                "name": name,
                "size_mb": size / 2**20,
                "latency_ms": 1e3 * tflite_latency(interpreter, images[0]),
                "agreement": float(np.mean(classes == keras_classes)),
            }
        )
    return rows


def format_table(rows: list[dict[str, float | str]]) -> str:
    """A text table of compare_tflite's rows (extra float keys become columns)."""
    keys = [k for k in rows[0] if k != "name"] if rows else []
    width = max([7] + [len(str(row["name"])) for row in rows])
    lines = [" | ".join(["variant".ljust(width)] + [k.rjust(11) for k in keys])]
    for row in rows:
        cells = [str(row["name"]).ljust(width)]
        for k in keys:
            value = row.get(k, float("nan"))
            if k in ("agreement", "miou"):
                text = f"{100 * value:.2f} %"
            else:
                text = f"{value:.1f}" if k.endswith("_ms") else f"{value:.3f}"
            cells.append(text.rjust(11))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def representative_images(
    cfg: config_lib.DataConfig, *, steps: int, height: int, width: int
) -> np.ndarray:
    """Labeled crops of `steps` training batches, to calibrate the int8 model.

    Args:
      cfg: the run's data config (model_dir/FLAGS.json); the unlabeled stream
        is left out.
      steps: number of training batches.
      height: TFLite input height (the crop height).
      width: TFLite input width.

    Returns:
      uint8 [steps * train_batch_size, height, width, 3].
    """
    # Crops at the TFLite size, with the run's scale augmentation.
    cfg = dataclasses.replace(cfg, unsup_ratio=0, crop_height=height, crop_width=width)
    dataset = streams.train_dataset(cfg)
    batches = [
        resize_images(batch[common.IMAGE].numpy(), height, width) for batch in dataset.take(steps)
    ]
    if not batches:
        raise ValueError(f"No training batch to calibrate int8 from --data_dir={cfg.data_dir}.")
    return np.concatenate(batches)


def eval_images(
    cfg: config_lib.DataConfig, *, num_images: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """The first `num_images` images and masks of --eval_split, resized.

    Args:
      cfg: the run's data config.
      num_images: how many (fewer if the split is smaller).
      height: output height (images bilinear, masks nearest).
      width: output width.

    Returns:
      images uint8 [n, height, width, 3], masks uint8 [n, height, width].
    """
    images, masks, count = [], [], 0
    for batch in streams.eval_dataset(cfg, cfg.eval_split):
        images.append(resize_images(batch[common.IMAGE].numpy(), height, width))
        masks.append(resize_masks(batch[common.MASK].numpy(), height, width))
        count += len(images[-1])
        if count >= num_images:
            break
    if not images:
        raise ValueError(f"No --eval_split={cfg.eval_split} image in --data_dir={cfg.data_dir}.")
    return np.concatenate(images)[:num_images], np.concatenate(masks)[:num_images]
