r"""Input pipeline throughput: full-size Cityscapes PNGs to training crops.

    python bench/input_pipeline.py [--num_images=4 --height=1024 --width=2048
                                    --crop_height=512 --crop_width=1024 --batch_size=2
                                    --num_batches=12]

Generates a few full-size images (uda_tf.data.fake_cityscapes) in a temp dir,
read over and over, then measures in one run (examples/s):
  decode-only, labeled      read + tf.io.decode_png of image and label
  decode-only, unlabeled    read + tf.io.decode_png of the image
  labeled stream            uda_tf.data.streams: decode, checks, trainIds, scale,
                            pad, crop, flip
  unlabeled, no RandAugment the ori view (decode, scale, pad, crop, flip)
  unlabeled, RandAugment    ori + the aug view (UDA RandAugment + Cutout)
and the ratio of each stream to its decode-only figure (target >= 0.7
without RandAugment).
"""

import dataclasses
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf
from absl import app, flags

from uda_tf import common
from uda_tf import config as config_lib
from uda_tf.data import fake_cityscapes, sources, streams

flags.DEFINE_integer("num_images", 4, "Distinct images generated (read repeatedly).")
flags.DEFINE_integer("height", 1024, "Image height.")
flags.DEFINE_integer("width", 2048, "Image width.")
flags.DEFINE_integer("crop_height", 512, "Crop height.")
flags.DEFINE_integer("crop_width", 1024, "Crop width.")
flags.DEFINE_integer("batch_size", 2, "Examples per batch.")
flags.DEFINE_integer("num_batches", 10, "Batches timed per measurement (after 2 warm-up).")
flags.DEFINE_integer("rounds", 3, "Rounds over all measurements; the median is reported.")
FLAGS = flags.FLAGS


def _rate(ds: tf.data.Dataset, batch_size: int, num_batches: int) -> float:
    """Examples per second over num_batches, after two warm-up batches."""
    it = iter(ds)
    for _ in range(2):
        next(it)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    rate = num_batches * batch_size / (time.perf_counter() - start)
    del it  # Stops its background work before the next measurement.
    return rate


def _decode_only(source: sources.Source, labeled: bool) -> tf.data.Dataset:
    def decode(x):
        out = {common.IMAGE: tf.io.decode_png(tf.io.read_file(x["image_path"]), channels=3)}
        if labeled:
            out[common.MASK] = tf.io.decode_png(tf.io.read_file(x["label_path"]), channels=1)
        return out

    return source.raw.repeat().map(decode, num_parallel_calls=tf.data.AUTOTUNE)


def _stream(source, cfg, fn) -> tf.data.Dataset:
    return streams._stream(source, cfg, common.UNSUP_STREAM, fn).batch(cfg.train_batch_size)


def _no_randaugment(image, mask, *, seed, cfg):
    del seed, cfg
    return image, mask, tf.constant([1.0, 0, 0, 0, 1.0, 0, 0, 0])


def main(argv):
    del argv
    b, n = FLAGS.batch_size, FLAGS.num_batches
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        fake_cityscapes.generate(
            tmp, num_train=FLAGS.num_images, num_val=0, num_extra=0,
            height=FLAGS.height, width=FLAGS.width,
        )  # fmt: skip
        print(f"generated {FLAGS.num_images} images of {FLAGS.height}x{FLAGS.width} "
              f"in {time.perf_counter() - start:.1f} s")  # fmt: skip
        cfg = config_lib.DataConfig(
            data_dir=tmp, train_batch_size=b, unsup_ratio=1, shuffle_buffer=16,
            crop_height=FLAGS.crop_height, crop_width=FLAGS.crop_width,
        )  # fmt: skip
        sup_source = sources.labeled_source(cfg, "train")
        unsup_source = sources.unlabeled_source(cfg)
        real = streams.randaugment_distort

        def plain_views(element, *, seed, cfg):
            streams.randaugment_distort = _no_randaugment
            try:  # Traced once, without RandAugment.
                return streams.unlabeled_views(element, seed=seed, cfg=cfg)
            finally:
                streams.randaugment_distort = real

        sup_cfg = dataclasses.replace(cfg, unsup_ratio=0)
        pipelines = {
            "decode-only, labeled": lambda: _decode_only(sup_source, True).batch(b),
            "decode-only, unlabeled": lambda: _decode_only(unsup_source, False).batch(b),
            "labeled stream": lambda: streams.train_dataset(sup_cfg),
            "unlabeled, no RandAugment": lambda: _stream(unsup_source, cfg, plain_views),
            "unlabeled, RandAugment": lambda: _stream(unsup_source, cfg, streams.unlabeled_views),
        }
        samples = {name: [] for name in pipelines}
        for _ in range(FLAGS.rounds):
            for name, make in pipelines.items():
                try:
                    samples[name].append(_rate(make(), b, n))
                except Exception as e:  # noqa: BLE001 (a bench reports what it can)
                    print(f"{name}: not measured ({type(e).__name__}: {e})"[:300])
        rates = {k: statistics.median(v) for k, v in samples.items() if v}
    print(f"\n1024x2048 PNGs -> {FLAGS.crop_height}x{FLAGS.crop_width} crops, "
          f"{os.cpu_count()} CPUs; batch {b}; median of {FLAGS.rounds} rounds of {n} batches")  # fmt: skip
    for name, rate in rates.items():
        print(f"{name:28s} {rate:8.2f} examples/s")
    print()
    ratios = (
        ("labeled stream", "decode-only, labeled"),
        ("unlabeled, no RandAugment", "decode-only, unlabeled"),
        ("unlabeled, RandAugment", "decode-only, unlabeled"),
    )
    for a, base in ratios:
        if a in rates:
            print(f"{a} / {base}: {rates[a] / rates[base]:.2f}")


if __name__ == "__main__":
    app.run(main)
