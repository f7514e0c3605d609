"""Shared fixtures of the export tests: synthetic scenes, a tiny fitted U-Net, a fake run."""

import functools
import os

import keras
import numpy as np
import tensorflow as tf

from uda_tf import config as config_lib
from uda_tf import models, train
from uda_tf.data import fake_cityscapes
from uda_tf.models import build_model

NUM_CLASSES = 4
HEIGHT, WIDTH = 64, 128
# Class colours of the synthetic scenes (RGB).
PALETTE = np.array([[200, 60, 50], [40, 160, 70], [50, 70, 190], [220, 210, 80]], np.float32)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def scenes(num: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [num, H, W, 3] of coloured rectangles and their masks [num, H, W]."""
    rng = np.random.default_rng(seed)
    masks = np.zeros([num, HEIGHT, WIDTH], np.uint8)
    for i in range(num):
        masks[i] = rng.integers(NUM_CLASSES)
        for _ in range(4):
            top, left = rng.integers(0, HEIGHT - 8), rng.integers(0, WIDTH - 8)
            h, w = rng.integers(8, HEIGHT // 2), rng.integers(8, WIDTH // 2)
            masks[i, top : top + h, left : left + w] = rng.integers(NUM_CLASSES)
    images = PALETTE[masks] + rng.normal(0, 12, [num, HEIGHT, WIDTH, 3])
    return np.clip(np.round(images), 0, 255).astype(np.uint8), masks


@functools.cache
def tiny_trained_model() -> keras.Model:
    """A U-Net fitted briefly to the synthetic scenes, so that its logits are separated."""
    keras.utils.set_random_seed(0)
    model = build_model("unet", NUM_CLASSES, unet_depth=2, unet_filters=8)
    images, masks = scenes(32, seed=1)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(images.astype(np.float32), masks, batch_size=8, epochs=6, verbose=0)
    return model


def encode_png(image: np.ndarray) -> bytes:
    return tf.io.encode_png(image).numpy()


def png_bomb(height: int, width: int) -> bytes:
    """A PNG signature and IHDR chunk declaring height x width, then junk."""
    ihdr = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x02\0\0\0"
    return b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + ihdr + b"\0" * 64


def jpeg_bomb(image: np.ndarray, height: int, width: int) -> bytes:
    """A real JPEG whose SOF0 header is rewritten to declare height x width."""
    data = bytearray(tf.io.encode_jpeg(image).numpy())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def fake_run(root: str) -> str:
    """A model_dir (FLAGS.json, one checkpoint of a tiny U-Net) over a generated tree."""
    data_dir = os.path.join(root, "cityscapes")
    fake_cityscapes.generate(data_dir, num_train=4, num_val=2, num_extra=0, height=64, width=128)
    model_dir = os.path.join(root, "run")
    cfg = config_lib.Config(
        data=config_lib.DataConfig(
            data_dir=data_dir, crop_height=32, crop_width=64, train_batch_size=2, eval_batch_size=2
        ),
        model=config_lib.ModelConfig(model_name="unet", unet_depth=2, unet_filters=8),
        train=config_lib.TrainConfig(model_dir=model_dir),
    )
    train.write_config(cfg, model_dir)
    network = models.build_model_from_config(cfg.model)
    checkpoint = tf.train.Checkpoint(ema_network=network)
    tf.train.CheckpointManager(checkpoint, model_dir, 1, checkpoint_name="ckpt").save(1)
    return model_dir
