"""Diagnostic: val mIoU of a run before and after recomputing its BN statistics on clean images.

    python -m uda_tf.experiments.bn_recalibration --model_dir=runs/.../frac1of8_uda_seed0 \
        [--data_dir=...] [--num_images=128]

UDA's train step normalises one concatenated batch [labeled, ori, aug], so the
batch-norm moving statistics that evaluation uses are those of a batch that is
two-fifths RandAugment views (Invert, Solarize, Equalize, Cutout...) at
unsup_ratio 2. This loads the run's EMA network, replaces every BN layer's
moving mean and variance by the statistics of `--num_images` clean unlabeled
train images (decoded and resized as in training, no augmentation: one
training-mode pass with momentum 0, layer by layer as the pass goes), and
evaluates --eval_split before and after. A large gain for UDA and none for
supervised-only runs means the augmented views' statistics cost accuracy.
"""

import dataclasses

import keras
import tensorflow as tf
from absl import app, flags, logging

from uda_tf import common, evaluate, train
from uda_tf.callbacks import eval_input
from uda_tf.data import sources, streams


def bn_layers(network: keras.Model) -> list[keras.layers.BatchNormalization]:
    """Every BatchNormalization layer of `network`, nested models included."""
    return [
        layer
        for layer in network._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def recalibrate(network: keras.Model, images: tf.Tensor) -> int:
    """Sets every BN layer's moving statistics to those of `images`.

    One forward pass in training mode with momentum 0: each layer's moving
    mean and variance become the batch statistics of its input, which is
    normalised by the batch statistics of the layers before it (the standard
    BN re-estimation). Only the moving statistics change.

    Args:
      network: images [N, H, W, 3] float32 in [0, 255] -> logits.
      images: float32 [N, H, W, 3], one batch.

    Returns:
      The number of BN layers recalibrated.

    Raises:
      ValueError: if the network has no BatchNormalization layer.
    """
    layers = bn_layers(network)
    if not layers:
        raise ValueError(f"Network {network.name!r} has no BatchNormalization layer.")
    momenta = [layer.momentum for layer in layers]
    try:
        for layer in layers:
            layer.momentum = 0.0
        network(images, training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return len(layers)


def clean_images(data_cfg, num_images: int) -> tf.Tensor:
    """float32 [n, H, W, 3]: the first `num_images` unlabeled train images, resized."""
    source = sources.unlabeled_source(data_cfg)
    ds = source.elements().map(lambda e: streams.resize_element(e, data_cfg.resize_factor))
    images = [e[common.IMAGE] for e in ds.take(num_images)]
    return tf.cast(tf.stack(images), tf.float32)


def miou(network, cfg, info) -> float:
    results = evaluate.evaluate(
        network, eval_input(cfg), class_names=info.class_names, ignore_label=cfg.data.ignore_label
    )
    return results["mean_iou"]


def main(argv: list[str]) -> None:
    del argv
    cfg = flags.FLAGS
    run_cfg = train.read_config(cfg.model_dir)
    if cfg.data_dir:
        run_cfg = dataclasses.replace(
            run_cfg, data=dataclasses.replace(run_cfg.data, data_dir=cfg.data_dir)
        )
    info = sources.check_num_classes(run_cfg.data)
    network = train.load_inference_model(cfg.model_dir)
    before = miou(network, run_cfg, info)
    count = recalibrate(network, clean_images(run_cfg.data, cfg.num_images))
    after = miou(network, run_cfg, info)
    logging.info("Recalibrated %d BN layers on %d clean images.", count, cfg.num_images)
    print(
        f"{cfg.model_dir}: unsup_ratio {run_cfg.uda.unsup_ratio}, "
        f"{run_cfg.data.eval_split} mIoU {100 * before:.2f} -> {100 * after:.2f} "
        f"({100 * (after - before):+.2f}) with BN statistics of {cfg.num_images} clean images"
    )


if __name__ == "__main__":
    flags.DEFINE_string("model_dir", None, "A training run's model_dir.", required=True)
    flags.DEFINE_string("data_dir", None, "Dataset root (default: the run's).")
    flags.DEFINE_integer("num_images", 128, "Clean unlabeled train images for the statistics.")
    app.run(main)
