r"""Input pipeline at Cityscapes scale: cost per core, and the cores that feed one accelerator.

    python bench/input_pipeline.py [--num_images=4 --height=1024 --width=2048
        --crop_height=512 --crop_width=1024 --num_examples=12 --rounds=3
        --cores=1,2 --batch_size=8 --step_ms=500]
    python bench/input_pipeline.py --data_service [--workers=1,2 --service_batches=6]

Generates a few full-size frames (uda_tf.data.fake_cityscapes) in a temp dir,
read over and over. Each pipeline runs on a private tf.data threadpool of k
threads (options.threading.private_threadpool_size = k, one thread per op:
max_intra_op_parallelism = 1), k = 1, 2 ... all cores (--cores), and is
reported as images/s/core, by wall time (images/s / k) and by CPU time
(images per CPU-second of the process: the cost per core, whatever else runs
on a shared machine), median of --rounds:
  png decode                read + tf.io.decode_png of one 2048x1024 frame
  png decode + label        ... and of its labelIds PNG
  labeled stream            decode, checks, scale, pad, crop, flip, trainIds
  unlabeled, ori view       decode, scale, pad, crop, flip
  unlabeled, RandAugment    ori + the aug view (UDA RandAugment + Cutout)
  unlabeled, colour view    ori + --aug_policy=color (if augment/color.py exists)
  unlabeled, + CutMix       RandAugment, then CutMix of batches of 4 (if augment/mix.py exists)
Then "cores needed to feed one accelerator" at --step_ms per step, labeled
batch B (--batch_size) and r = 1, 3, 7: (B / labeled + r B / unlabeled) per
core-second, with the 1-thread CPU figures.

--data_service: the training stream (r = 1, batch --service_batch_size)
made in this process, then by 1 and 2 (--workers) local worker processes of
`python -m uda_tf.data.service`, as examples/s and the trainer's CPU-seconds
per step; and the projection for a 16-core input host from the per-core
figures (measured again, 1 thread, CPU time).
"""

import dataclasses
import importlib.util
import inspect
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import tensorflow as tf
from absl import app, flags

from augment import seeds
from uda_tf import common
from uda_tf import config as config_lib
from uda_tf.data import fake_cityscapes, service, sources, streams

flags.DEFINE_integer("num_images", 4, "Distinct frames generated (read repeatedly).")
flags.DEFINE_integer("height", 1024, "Frame height.")
flags.DEFINE_integer("width", 2048, "Frame width.")
flags.DEFINE_integer("crop_height", 512, "Crop height.")
flags.DEFINE_integer("crop_width", 1024, "Crop width.")
flags.DEFINE_integer("num_examples", 12, "Images timed per measurement (after warm-up).")
flags.DEFINE_integer("rounds", 3, "Rounds over all measurements; the median is reported.")
flags.DEFINE_list("cores", None, "Threadpool sizes to measure (default 1 ... all cores).")
flags.DEFINE_integer("batch_size", 8, "B of the cores-needed table (labeled images per step).")
flags.DEFINE_float("step_ms", 500.0, "Accelerator step time of the cores-needed table.")
flags.DEFINE_bool("data_service", False, "Compare local input with local tf.data service workers.")
flags.DEFINE_list("workers", ["1", "2"], "--data_service: numbers of worker processes.")
flags.DEFINE_integer("service_batch_size", 2, "--data_service: labeled batch (r = 1).")
flags.DEFINE_integer("service_batches", 6, "--data_service: batches timed (after 2 warm-up).")
FLAGS = flags.FLAGS

RATIOS = (1, 3, 7)
PROJECTED_CORES = 16


def _threads(ds: tf.data.Dataset, k: int) -> tf.data.Dataset:
    options = tf.data.Options()
    options.threading.private_threadpool_size = k
    options.threading.max_intra_op_parallelism = 1
    options.autotune.cpu_budget = k
    return ds.with_options(options)


def _rate(ds: tf.data.Dataset, num_images: int, images_per_element: int = 1):
    """(images per second, images per CPU-second of this process) over about num_images.

    CPU time (all threads, time.process_time) is the cost per core whatever
    else runs on the machine; wall time is what this machine delivered.
    """
    it = iter(ds)
    for _ in range(2):
        next(it)
    elements = max(1, num_images // images_per_element)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(elements):
        next(it)
    images = elements * images_per_element
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    del it  # Stops its background work before the next measurement.
    return images / wall, images / max(cpu, 1e-9)


def _decode_only(source: sources.Source, labeled: bool) -> tf.data.Dataset:
    def decode(x):
        out = {common.IMAGE: tf.io.decode_png(tf.io.read_file(x["image_path"]), channels=3)}
        if labeled:
            out[common.MASK] = tf.io.decode_png(tf.io.read_file(x["label_path"]), channels=1)
        return out

    return source.raw.repeat().map(decode, num_parallel_calls=tf.data.AUTOTUNE)


def _no_randaugment(image, mask, *, seed, cfg):
    del seed, cfg
    return image, mask, tf.constant([1.0, 0, 0, 0, 1.0, 0, 0, 0])


def _wired(field: str) -> bool:
    """Whether the streams module reads this DataConfig field (a policy someone is adding)."""
    return field in inspect.getsource(streams)


def _pipelines(cfg, sup_source, unsup_source, *, all_of_them: bool = True) -> dict:
    """name -> (make dataset, images per element)."""
    real = streams.randaugment_distort

    def plain_views(element, *, seed, cfg):
        streams.randaugment_distort = _no_randaugment
        try:  # Traced once, without RandAugment.
            return streams.unlabeled_views(element, seed=seed, cfg=cfg)
        finally:
            streams.randaugment_distort = real

    def unsup(c, fn=streams.unlabeled_views):
        return streams._stream(unsup_source, c, common.UNSUP_STREAM, fn)

    def labeled():
        return streams._stream(
            sup_source, cfg, common.SUP_STREAM, streams.labeled_crop,
            label_table=sup_source.label_table,
        )  # fmt: skip

    found = {"labeled stream": (labeled, 1), "unlabeled, RandAugment": (lambda: unsup(cfg), 1)}
    if not all_of_them:
        return found
    found = {
        "png decode": (lambda: _decode_only(unsup_source, False), 1),
        "png decode + label": (lambda: _decode_only(sup_source, True), 1),
        **found,
        "unlabeled, ori view": (lambda: unsup(cfg, plain_views), 1),
    }
    if importlib.util.find_spec("augment.color") and _wired("aug_policy"):
        color = dataclasses.replace(cfg, aug_policy="color")
        found["unlabeled, colour view"] = (lambda: unsup(color), 1)
    if importlib.util.find_spec("augment.mix"):
        from augment import mix

        def cutmix():
            batches = unsup(cfg).batch(4, drop_remainder=True).enumerate()
            return batches.map(
                lambda i, b: mix.cutmix_batch(
                    b, seed=seeds.example_seed(cfg.seed, getattr(common, "MIX_STREAM", 3), i)
                )
            )

        found["unlabeled, + CutMix"] = (cutmix, 4)
    return found


def _per_core(pipelines: dict, cores: list[int]) -> tuple[dict, dict]:
    """name -> {k: median images/s/core with k threads}, by wall time and by CPU time."""
    samples = {(name, k): [] for name in pipelines for k in cores}
    for _ in range(FLAGS.rounds):
        for name, (make, per_element) in pipelines.items():
            for k in cores:
                try:
                    wall, cpu = _rate(_threads(make(), k), FLAGS.num_examples * k, per_element)
                    samples[name, k].append((wall / k, cpu))
                except Exception as e:  # noqa: BLE001 (a bench reports what it can)
                    print(f"{name}: not measured ({type(e).__name__}: {e})"[:300])
    by_wall, by_cpu = {}, {}
    for (name, k), values in samples.items():
        if values:
            by_wall.setdefault(name, {})[k] = statistics.median(v[0] for v in values)
            by_cpu.setdefault(name, {})[k] = statistics.median(v[1] for v in values)
    return by_wall, by_cpu


def _cores_needed(per_core: dict, b: int, step_ms: float) -> None:
    sup = per_core["labeled stream"][1]
    print(f"\ncores needed to feed one accelerator at {step_ms:g} ms/step, B = {b} "
          f"(1 thread, images per CPU-second)\n")  # fmt: skip
    views = [n for n in per_core if n.startswith("unlabeled") and "ori view" not in n]
    print("| r | images/step | " + " | ".join(views) + " |")
    print("|---|---|" + "---|" * len(views))
    for r in RATIOS:
        cells = [f"{(b / sup + r * b / per_core[v][1]) / (step_ms / 1000):.1f}" for v in views]
        print(f"| {r} | {b + r * b} | " + " | ".join(cells) + " |")


def _report_per_core(by_wall: dict, by_cpu: dict, cores: list[int]) -> None:
    load = os.getloadavg()[0]
    print(f"\n{FLAGS.height}x{FLAGS.width} PNGs -> {FLAGS.crop_height}x{FLAGS.crop_width} "
          f"crops, {os.cpu_count()} CPUs (load {load:.1f}); median of {FLAGS.rounds}; "
          "images/s/core: wall (images/s / threads) and CPU (images per CPU-second)\n")  # fmt: skip
    head = [f"{k} thread{'s' * (k > 1)}, {kind}" for k in cores for kind in ("wall", "CPU")]
    print("| pipeline | " + " | ".join(head) + " |")
    print("|---|" + "---|" * len(head))
    for name in by_wall:
        cells = [
            f"{table[name][k]:.2f}" if k in table[name] else "-"
            for k in cores
            for table in (by_wall, by_cpu)
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


def _start_workers(dispatcher, n: int, log_dir: str) -> list[subprocess.Popen]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, "-m", "uda_tf.data.service", "--role=worker",
               f"--dispatcher_address={dispatcher.target}", "--run_seconds=900"]  # fmt: skip
    workers = []
    for i in range(n):
        with open(os.path.join(log_dir, f"worker{i}.log"), "w") as log:
            workers.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log))
    deadline = time.monotonic() + 180
    while dispatcher._num_workers() < n and time.monotonic() < deadline:
        time.sleep(0.2)
    if dispatcher._num_workers() < n:
        raise RuntimeError(f"{dispatcher._num_workers()} of {n} workers registered in 180 s.")
    return workers


def _data_service(cfg, tmp: str) -> dict:
    """Training-stream examples/s: local, then through 1, 2 ... local worker processes."""
    b = cfg.train_batch_size
    per_batch = b * (1 + cfg.unsup_ratio)
    rates = {"local (this process)": _rate(streams.train_dataset(cfg), FLAGS.service_batches)}
    for n in map(int, FLAGS.workers):
        dispatcher = service.start_dispatcher()
        workers = []
        try:
            workers = _start_workers(dispatcher, n, tmp)
            ds = service.distribute(streams.train_dataset(cfg, splittable=True), dispatcher.target)
            rates[f"tf.data service, {n} worker{'s' * (n > 1)}"] = _rate(ds, FLAGS.service_batches)
        finally:
            for worker in workers:
                worker.terminate()
                worker.wait(timeout=60)
            dispatcher.stop()
    # (examples/s, trainer CPU-seconds per step): a batch is one "image" of _rate.
    return {name: (wall * per_batch, 1 / cpu) for name, (wall, cpu) in rates.items()}


def main(argv):
    del argv
    cores = [int(k) for k in FLAGS.cores] if FLAGS.cores else list(range(1, os.cpu_count() + 1))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        fake_cityscapes.generate(
            tmp, num_train=FLAGS.num_images, num_val=0, num_extra=0,
            height=FLAGS.height, width=FLAGS.width,
        )  # fmt: skip
        print(f"generated {FLAGS.num_images} images of {FLAGS.height}x{FLAGS.width} "
              f"in {time.perf_counter() - start:.1f} s")  # fmt: skip
        cfg = config_lib.DataConfig(
            data_dir=tmp, train_batch_size=FLAGS.service_batch_size, unsup_ratio=1,
            shuffle_buffer=16, crop_height=FLAGS.crop_height, crop_width=FLAGS.crop_width,
        )  # fmt: skip
        sup_source = sources.labeled_source(cfg, "train")
        unsup_source = sources.unlabeled_source(cfg)
        if FLAGS.data_service:
            rates = _data_service(cfg, tmp)
            pipelines = _pipelines(cfg, sup_source, unsup_source, all_of_them=False)
            _, per_core = _per_core(pipelines, [1])
        else:
            by_wall, per_core = _per_core(_pipelines(cfg, sup_source, unsup_source), cores)
    if not FLAGS.data_service:
        _report_per_core(by_wall, per_core, cores)
        _cores_needed(per_core, FLAGS.batch_size, FLAGS.step_ms)
        return
    b = cfg.train_batch_size
    print(f"\ntraining stream, r = 1, batch {b} + {b}, {os.cpu_count()} CPUs, examples/s\n")
    print("| input | examples/s | steps/s | trainer CPU-s per step |")
    print("|---|---|---|---|")
    for name, (rate, cpu_per_step) in rates.items():
        print(f"| {name} | {rate:.2f} | {rate / (2 * b):.2f} | {cpu_per_step:.2f} |")
    sup, unsup = per_core["labeled stream"][1], per_core["unlabeled, RandAugment"][1]
    print(f"\nper core (1 thread, CPU time): labeled {sup:.2f}, unlabeled + RandAugment "
          f"{unsup:.2f} images/s; projection for a {PROJECTED_CORES}-core input host, B = "
          f"{FLAGS.batch_size}\n")  # fmt: skip
    print("| r | core-s per step | steps/s on 16 cores | step time fed (ms) |")
    print("|---|---|---|---|")
    for r in RATIOS:
        core_s = FLAGS.batch_size / sup + r * FLAGS.batch_size / unsup
        steps = PROJECTED_CORES / core_s
        print(f"| {r} | {core_s:.2f} | {steps:.2f} | {1000 / steps:.0f} |")


if __name__ == "__main__":
    app.run(main)
