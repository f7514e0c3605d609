r"""Exported models side by side: file size, CPU latency, agreement with Keras, mIoU.

    python bench/serving.py                    # a U-Net trained here on a generated tree
    python bench/serving.py --model_dir=D      # a trained run: its EMA weights, its data

Rows: the SavedModel (serving_default, what TF Serving runs) and each TFLite
variant (float32, float16, int8; float32 and int8 also without the
probabilities output) at one input size; every row runs on the same
validation images, resized to that size. Latency: the best and the median
time of one image (batch 1) on --num_threads CPU threads, over --repeats runs
taken in round-robin over the rows, so that each row sees the same load of a
shared machine. Agreement: the fraction of pixels whose class equals the Keras
model's. mIoU: over the resized masks. Without --model_dir, a small U-Net is first trained
(supervised, --train_steps) on a tree of `uda_tf.data.fake_cityscapes`, so that its
logits mean something; its mIoU is that of a briefly trained toy model.
"""

import dataclasses
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from uda_tf import common, metrics, train
from uda_tf import config as config_lib
from uda_tf.data import fake_cityscapes, streams
from uda_tf.export import saved_model, serving
from uda_tf.export import tflite as tflite_lib
from uda_tf.models import build_model_from_config

flags.DEFINE_string("model_dir", None, "A trained run; default: train a small U-Net here.")
flags.DEFINE_string("data_dir", None, "Overrides the run's data; default: a generated tree.")
flags.DEFINE_integer("height", 256, "Input height of every row (TFLite and evaluation).")
flags.DEFINE_integer("width", 512, "Input width of every row.")
flags.DEFINE_integer("num_images", 8, "Validation images.")
flags.DEFINE_integer("num_threads", 1, "CPU threads of TF and LiteRT.")
flags.DEFINE_integer("repeats", 20, "Timed runs per latency (round-robin over the rows).")
flags.DEFINE_integer("representative_steps", 4, "Training batches calibrating int8.")
flags.DEFINE_integer("train_steps", 200, "Steps of the model trained here (no --model_dir).")
flags.DEFINE_integer("unet_depth", 3, "U-Net depth of the model trained here.")
flags.DEFINE_integer("unet_filters", 16, "U-Net filters of the model trained here.")
FLAGS = flags.FLAGS


def _train_here(root: str) -> tuple[keras.Model, config_lib.Config]:
    data_dir = FLAGS.data_dir
    if data_dir is None:
        data_dir = os.path.join(root, "cityscapes")
        fake_cityscapes.generate(data_dir, num_train=24, num_val=FLAGS.num_images, num_extra=0)
    cfg = config_lib.Config(
        data=config_lib.DataConfig(
            data_dir=data_dir, crop_height=128, crop_width=256, train_batch_size=4
        ),
        model=config_lib.ModelConfig(
            model_name="unet", unet_depth=FLAGS.unet_depth, unet_filters=FLAGS.unet_filters
        ),
    ).validate()
    keras.utils.set_random_seed(0)
    model = build_model_from_config(cfg.model)
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=common.IGNORE_LABEL
        ),
    )
    batches = streams.train_dataset(cfg.data).map(
        lambda b: (tf.cast(b[common.IMAGE], tf.float32), b[common.MASK])
    )
    start = time.perf_counter()
    history = model.fit(batches, steps_per_epoch=FLAGS.train_steps, epochs=1, verbose=0)
    print(
        f"Trained a U-Net (depth {FLAGS.unet_depth}, {FLAGS.unet_filters} filters) for "
        f"{FLAGS.train_steps} steps in {time.perf_counter() - start:.0f} s, final loss "
        f"{history.history['loss'][-1]:.3f}, on {data_dir}."
    )
    return model, cfg


def _miou(classes: np.ndarray, masks: np.ndarray, num_classes: int) -> float:
    valid = masks != common.IGNORE_LABEL
    index = masks[valid].astype(np.int64) * num_classes + classes[valid]
    confusion = np.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)
    return metrics.mean_iou_from_confusion(confusion)


def _dir_size_mb(path: str) -> float:
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs]
    return sum(sizes) / 2**20


def _row(name, size_mb, classes, keras_classes, masks, num_classes) -> dict:
    return {
        "name": name,
        "size_mb": size_mb,
        "agreement": float(np.mean(classes == keras_classes)),
        "miou": _miou(classes, masks, num_classes),
    }


def _time_interleaved(runs: dict, image: np.ndarray) -> dict[str, tuple[float, float]]:
    """Best and median ms of each run(image), in round-robin so every run sees the same load."""
    times = {name: [] for name in runs}
    for name, run in runs.items():
        run(image)  # Warm-up.
    for _ in range(FLAGS.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run(image)
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: (min(t), float(np.median(t))) for name, t in times.items()}


def main(argv: list[str]) -> None:
    del argv
    tf.config.threading.set_intra_op_parallelism_threads(FLAGS.num_threads)
    tf.config.threading.set_inter_op_parallelism_threads(FLAGS.num_threads)
    root = tempfile.mkdtemp(prefix="bench_export_")
    if FLAGS.model_dir:
        model, cfg = train.load_inference_model(FLAGS.model_dir), train.read_config(FLAGS.model_dir)
        if FLAGS.data_dir:
            data_cfg = dataclasses.replace(cfg.data, data_dir=FLAGS.data_dir)
            cfg = dataclasses.replace(cfg, data=data_cfg)
        print(f"Model: the EMA weights of {FLAGS.model_dir}.")
    else:
        model, cfg = _train_here(root)
    height, width, num_classes = FLAGS.height, FLAGS.width, cfg.data.num_classes
    images, masks = tflite_lib.eval_images(
        cfg.data, num_images=FLAGS.num_images, height=height, width=width
    )
    keras_classes = np.argmax(model.predict(images.astype(np.float32), verbose=0), axis=-1)
    print(
        f"{len(images)} {cfg.data.eval_split} images at {height}x{width}; Keras mIoU "
        f"{100 * _miou(keras_classes, masks, num_classes):.2f} %; {FLAGS.num_threads} thread(s)."
    )
    path = saved_model.export_saved_model(model, os.path.join(root, "export"))
    serve = tf.saved_model.load(path).signatures[serving.SERVING_DEFAULT]
    classes = np.concatenate([serve(images=image[None])[serving.CLASSES] for image in images])
    name = "SavedModel serving_default"
    rows = [_row(name, _dir_size_mb(path), classes, keras_classes, masks, num_classes)]
    runs = {name: lambda image: serve(images=image[None])}
    calibration = tflite_lib.representative_images(
        cfg.data, steps=FLAGS.representative_steps, height=height, width=width
    )
    variants = [(q, True) for q in tflite_lib.QUANTIZATIONS]
    variants += [("float32", False), ("int8", False)]
    for quantization, probabilities in variants:
        start = time.perf_counter()
        content = tflite_lib.convert_tflite(
            model,
            quantization=quantization,
            height=height,
            width=width,
            representative_images=calibration,
            probabilities=probabilities,
        )
        seconds = time.perf_counter() - start
        interpreter = tflite_lib.load_tflite(content, num_threads=FLAGS.num_threads)
        classes = tflite_lib.run_tflite(interpreter, images)[serving.CLASSES]
        name = f"TFLite {quantization}" + ("" if probabilities else ", classes only")
        rows.append(_row(name, len(content) / 2**20, classes, keras_classes, masks, num_classes))
        runner = interpreter.get_signature_runner(tflite_lib.SIGNATURE_KEY)
        runs[name] = lambda image, runner=runner: runner(images=image[None])
        print(f"Converted {name} in {seconds:.1f} s.")
    latencies = _time_interleaved(runs, images[0])
    for row in rows:
        row["best_ms"], row["median_ms"] = latencies[row["name"]]
    print(tflite_lib.format_table(rows))
    f32, f16, i8, f32_classes, i8_classes = rows[1:]
    print(
        f"Best-of-{FLAGS.repeats} latency. int8 vs float32 TFLite: "
        f"{f32['best_ms'] / i8['best_ms']:.2f}x faster, "
        f"{f32['size_mb'] / i8['size_mb']:.2f}x smaller; classes only: "
        f"{f32_classes['best_ms'] / i8_classes['best_ms']:.2f}x faster. float16 vs float32: "
        f"{f32['best_ms'] / f16['best_ms']:.2f}x faster, "
        f"{f32['size_mb'] / f16['size_mb']:.2f}x smaller."
    )


if __name__ == "__main__":
    app.run(main)
