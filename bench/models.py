"""Size, FLOPs and CPU training speed of the segmentation models.

For each full-size model: parameters (all, and trainable: PyTorch-style counts
leave out the BN moving statistics), conv FLOPs per image at --flops_size
(2 x multiply-adds of every Conv2D / DepthwiseConv2D / SeparableConv2D /
Conv2DTranspose; BN, ReLU, pooling and resizes are left out, < 1%), and the
wall time of the fastest of --reps forward+backward steps (tf.function,
training mode, sparse cross-entropy) on --batch images of --time_size. The
achieved FLOP/s counts a step as 3x the forward FLOPs and is compared with a
large float32 matmul measured in the same run (before and after the models).
On a shared machine the times vary from run to run; the ratio to the matmul
varies less.

It also checks the FLOP counter on the ImageNet backbones without dilation
(224x224; Xception 299x299) against their published multiply-adds, and the
backbone parameter counts against keras.applications models built here with
weights=None.

    python bench/models.py                                     # ~3 min on 2 cores
    python bench/models.py --time_size=512x1024 --batch=1 --reps=3
    python bench/models.py --models=deeplabv3plus_mobilenetv2,unet --nokeras_check
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags

from uda_tf.models import backbones, build_model

MODELS = {
    "deeplabv3plus_resnet50": {"model_name": "deeplabv3plus", "backbone": "resnet50"},
    "deeplabv3plus_resnet50_os8": {
        "model_name": "deeplabv3plus",
        "backbone": "resnet50",
        "output_stride": 8,
    },
    "deeplabv3plus_resnet101": {"model_name": "deeplabv3plus", "backbone": "resnet101"},
    "deeplabv3plus_mobilenetv2": {"model_name": "deeplabv3plus", "backbone": "mobilenetv2"},
    "deeplabv3plus_xception": {"model_name": "deeplabv3plus", "backbone": "xception"},
    "unet": {"model_name": "unet"},
}
# Published multiply-adds (G) of the ImageNet classifiers and the input size
# they are given for: ResNet paper Table 1 (stride on the 1x1 conv, as here
# and in keras.applications); MobileNetV2 paper (with its Conv_1 to 1280
# channels and FC, 0.02G, which these backbones leave out); NASNet paper
# Table 2 for Xception (299x299, keras's default size).
PUBLISHED_GMACS = {
    "resnet50": (3.8, 224),
    "resnet101": (7.6, 224),
    "mobilenetv1": (0.57, 224),
    "mobilenetv2": (0.30, 224),
    "mobilenetv2_torchvision": (0.30, 224),
    "xception": (8.4, 299),
}
KERAS_APPS = {
    "resnet50": "ResNet50",
    "resnet101": "ResNet101",
    "mobilenetv1": "MobileNet",
    "mobilenetv2": "MobileNetV2",
    "mobilenetv2_torchvision": "MobileNetV2",
    "xception": "Xception",
}

FLAGS = flags.FLAGS
flags.DEFINE_list("models", list(MODELS), f"Models to measure, from {list(MODELS)}.")
flags.DEFINE_string("flops_size", "512x1024", "HxW at which FLOPs are counted.")
flags.DEFINE_string("time_size", "128x256", "HxW of the timed steps (512x1024: slow on CPU).")
flags.DEFINE_integer("batch", 2, "Images per timed step.")
flags.DEFINE_integer("reps", 3, "Timed steps per model (the fastest counts), after a warm-up.")
flags.DEFINE_integer("num_classes", 19, "Output classes.")
flags.DEFINE_integer("matmul_size", 2048, "N of the N x N float32 reference matmul.")
flags.DEFINE_bool("timing", True, "Time forward+backward steps.")
flags.DEFINE_bool("keras_check", True, "Compare backbones with keras.applications.")


def _size(text):
    h, w = text.lower().split("x")
    return int(h), int(w)


def conv_flops(model: keras.Model, height: int, width: int) -> int:
    """2 x multiply-adds of the convolutions for one [height, width] image."""
    total = 0

    def trace(op):
        def call(*args, **kwargs):
            nonlocal total
            if isinstance(op, keras.Model):  # A nested functional model.
                out = op._run_through_graph(args[0], operation_fn=trace)
            else:
                out = op.compute_output_spec(*args, **kwargs)
            total += _layer_flops(op, args[0], out)
            return out

        return call

    model._run_through_graph(keras.KerasTensor((1, height, width, 3)), operation_fn=trace)
    return total


def _layer_flops(layer, x, y) -> int:
    if not isinstance(x, keras.KerasTensor) or not isinstance(y, keras.KerasTensor):
        return 0
    c_in, (h_out, w_out, c_out) = x.shape[-1], y.shape[1:]
    if isinstance(layer, keras.layers.Conv2DTranspose):
        kh, kw = layer.kernel_size
        return 2 * x.shape[1] * x.shape[2] * kh * kw * c_in * c_out
    if isinstance(layer, keras.layers.SeparableConv2D):
        kh, kw = layer.kernel_size
        mid = c_in * layer.depth_multiplier
        return 2 * h_out * w_out * (kh * kw * mid + mid * c_out)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kh, kw = layer.kernel_size
        return 2 * h_out * w_out * kh * kw * c_out
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw = layer.kernel_size
        return 2 * h_out * w_out * kh * kw * c_in * c_out
    return 0


def matmul_flops_per_s(n: int, reps: int = 5) -> float:
    a = tf.random.stateless_normal([n, n], [1, 2])
    b = tf.random.stateless_normal([n, n], [3, 4])
    matmul = tf.function(lambda a, b: tf.reduce_sum(tf.matmul(a, b)))
    matmul(a, b).numpy()
    start = time.perf_counter()
    for _ in range(reps):
        matmul(a, b).numpy()
    return 2 * n**3 * reps / (time.perf_counter() - start)


def time_step(model: keras.Model, height: int, width: int, batch: int, reps: int):
    """Returns (seconds of the first call, fastest of `reps` later steps in seconds)."""
    x = tf.random.stateless_uniform([batch, height, width, 3], [0, 1], 0, 255.0)
    y = tf.random.stateless_uniform([batch, height, width], [0, 2], 0, 19, tf.int32)
    y = tf.minimum(y, model.output_shape[-1] - 1)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(jit_compile=False)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        return loss + tf.add_n([tf.reduce_sum(g) for g in grads]) * 0.0

    start = time.perf_counter()
    step(x, y).numpy()
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):  # The fastest step is the least disturbed by other processes.
        start = time.perf_counter()
        step(x, y).numpy()
        times.append(time.perf_counter() - start)
    return first, min(times)


def check_backbones():
    print("\nBackbones without dilation: FLOP counter and parameter counts")
    print(
        f"{'backbone':<23} {'size':>4} {'GMACs':>7} {'published':>9} {'params':>12} "
        f"{'keras.app':>12}"
    )
    for name in backbones.BACKBONES:
        net = backbones.build_backbone(name, output_stride=32)
        published, size = PUBLISHED_GMACS[name]
        gmacs = conv_flops(net, size, size) / 2e9
        keras_params = "-"
        if FLAGS.keras_check:
            ctor = getattr(keras.applications, KERAS_APPS[name])
            ref = ctor(weights=None, include_top=False, input_shape=(None, None, 3))
            keras_params = f"{ref.count_params():,}"
        print(
            f"{name:<23} {size:4d} {gmacs:7.2f} {published:9.2f} "
            f"{net.count_params():12,} {keras_params:>12}"
        )
    print(
        "Notes: published MACs include the classifier top (ResNet FC 2M MACs; MobileNetV2"
        " Conv_1 + FC 0.02G); keras MobileNetV2 notop also has Conv_1 (414,720 params),"
        " which DeepLab (and this backbone) leaves out."
    )


def main(argv):
    del argv
    tf.get_logger().setLevel("ERROR")  # One tf.function per model is not a retracing problem.
    flops_h, flops_w = _size(FLAGS.flops_size)
    time_h, time_w = _size(FLAGS.time_size)
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs")
    matmul_before = matmul_flops_per_s(FLAGS.matmul_size)
    print(f"Reference {FLAGS.matmul_size}^2 float32 matmul: {matmul_before / 1e9:.1f} GFLOP/s")
    rows = []
    for key in FLAGS.models:
        if key not in MODELS:
            raise ValueError(f"--models: unknown {key!r}, expected names from {list(MODELS)}.")
        keras.utils.clear_session()
        model = build_model(num_classes=FLAGS.num_classes, **MODELS[key])
        params = model.count_params()
        trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
        backbone = model.get_layer("backbone").count_params() if "deeplab" in key else 0
        row = {
            "key": key,
            "params": params,
            "trainable": trainable,
            "backbone": backbone,
            "gflops": conv_flops(model, flops_h, flops_w) / 1e9,
        }
        if FLAGS.timing:
            first, per_step = time_step(model, time_h, time_w, FLAGS.batch, FLAGS.reps)
            step_flops = 3 * conv_flops(model, time_h, time_w) * FLAGS.batch
            row.update(first=first, ms=1e3 * per_step / FLAGS.batch, flops_s=step_flops / per_step)
        rows.append(row)
        print(f"  measured {key}", flush=True)
    matmul = (matmul_before + matmul_flops_per_s(FLAGS.matmul_size)) / 2
    print(f"Reference matmul, mean of before and after: {matmul / 1e9:.1f} GFLOP/s")
    print(
        f"\n{'model':<27} {'params':>8} {'trainable':>9} {'backbone':>8} "
        f"{'GFLOPs':>7}  | fwd+bwd at {time_h}x{time_w}, batch {FLAGS.batch}:"
        f" {'ms/img':>7} {'GFLOP/s':>7} {'of matmul':>9} {'1st call s':>10}"
    )
    print(f"{'':<27} {'(M)':>8} {'(M)':>9} {'(M)':>8} {f'@{flops_h}x{flops_w}':>7}")
    for r in rows:
        line = (
            f"{r['key']:<27} {r['params'] / 1e6:8.2f} {r['trainable'] / 1e6:9.2f} "
            f"{r['backbone'] / 1e6:8.2f} {r['gflops']:7.1f}  |"
        )
        if "ms" in r:
            line += (
                f"{'':<33} {r['ms']:7.0f} {r['flops_s'] / 1e9:7.1f} "
                f"{r['flops_s'] / matmul:9.0%} {r['first']:10.1f}"
            )
        print(line)
    check_backbones()


if __name__ == "__main__":
    app.run(main)
