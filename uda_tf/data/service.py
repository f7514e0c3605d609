r"""tf.data service: the training streams run on CPU workers, the trainer only consumes batches.

    python -m uda_tf.data.service --role=dispatcher --port=5050 --work_dir=/shared/uda_dispatcher
    python -m uda_tf.data.service --role=worker --dispatcher_address=dispatcher-host:5050 \
        --port=5051 --worker_address=$(hostname):5051 --data_dir=/data/cityscapes

and train with `--data_service_address=grpc://dispatcher-host:5050` (README:
"Input at scale: tf.data service"). The trainer builds the streams as usual
(the file checks run there) and sends their graph to the dispatcher; workers
read the files by the same paths, decode, crop, augment and batch.

Design (streams.train_dataset(cfg, splittable=True), then `distribute`):
- Sharding: ShardingPolicy.DYNAMIC. Its source must be splittable, so the
  stream's source is a `Dataset.range` of EPOCHS: one split = one epoch of
  one stream (labeled, unlabeled), processed by one worker. The stream is
  endless (an endless job), as the local `.repeat()`; the workers take epochs
  0, 1, 2, ... as they ask for splits, so W workers produce W epochs at once.
- Order and seeds: a worker turns epoch e into exactly the local stream's
  epoch e: its permutation is the local one (`range(n).shuffle(buffer, seed)
  .repeat()`, advanced e epochs, gives the same indices as the local
  `raw.shuffle(buffer, seed).repeat()`, whose draws do not depend on the
  elements), and example p of it gets the index e * n + p, hence the local
  per-example seed `example_seed(seed, stream, index)`. Every epoch has the
  same (file, seed) pairs, so the same crops and augmentations, as local
  input; only the ORDER differs (W epochs interleave, and a batch is made of
  one worker's examples; with one worker the batches are the local ones, bit
  for bit). Advancing the permutation costs e * n index draws (~10 us each)
  per epoch, a small part of decoding n images.
- Failures: DYNAMIC is at most once. A worker that stops loses the rest of
  the epochs it holds (one per stream); training goes on with the other
  workers' epochs, no example is produced twice, none is reassigned.
- CutMix (--unsup_mix): a batch is mixed on its worker with the seed of a
  step number from a range that DYNAMIC sharding also splits, so each step
  seed is used once; the mixed batches are not the local ones (their images
  differ), their draws are.
- Several input pipelines (multi_worker trainers) share one job (a job name
  from the config): workers batch B / pipelines examples, each pipeline gets
  its own batches and keeps them all (CutMix partners are made global by
  `global_partners`).
- Sources: folder-type readers (folder, simple, camvid), whose raw elements
  are file paths, are materialized into the graph (paths only, no pixels);
  TFRecord and TFDS sources are refused.
"""

import dataclasses
import hashlib
import json
import re
import time

import tensorflow as tf
from absl import app, flags, logging

from uda_tf import common
from uda_tf import config as config_lib
from uda_tf.data.base import Source

service_lib = tf.data.experimental.service
MAX_EPOCHS = 2**62  # Endless, as the local .repeat().


def check_address(address: str) -> str:
    """`grpc://host:port` from `grpc://host:port` or `host:port`.

    Raises:
      ValueError: if `address` is not of that form.
    """
    match = re.fullmatch(config_lib.DATA_SERVICE_ADDRESS, address or "")
    if not match or int(match.group(3)) > 65535:
        raise ValueError(
            f"--data_service_address={address!r} is invalid: expected grpc://host:port "
            "(the dispatcher of `python -m uda_tf.data.service --role=dispatcher`)."
        )
    return address if match.group(1) else f"grpc://{address}"


def splittable_order(source: Source, *, shuffle_seed: int, start_index: int = 0):
    """The local order of one stream as (index, raw) pairs, one DYNAMIC split per epoch.

    Equals `source.raw.shuffle(source.shuffle_buffer, seed=shuffle_seed)
    .repeat().enumerate()` when read in order (see the module docstring).

    Args:
      source: a folder-type Source (raw elements: dicts of string scalars).
      shuffle_seed: the op seed of the local shuffle.
      start_index: the first index (a resumed stream); earlier ones are skipped.

    Returns:
      A dataset of (int64 index, raw element) whose only source is a range of epochs.

    Raises:
      ValueError: if the source's raw elements are not file paths.
    """
    spec = source.raw.element_spec
    if not isinstance(spec, dict) or "image_path" not in spec:
        raise ValueError(
            "--data_service_address needs a folder-type --data_source (folder, simple, camvid): "
            "the service workers read the image files by path. TFRecord and TFDS sources "
            "are not supported through the service."
        )
    n = source.num_examples
    table = source.raw.batch(n).get_single_element()  # {key: string [n]}: paths, no pixels.
    first_epoch, first_offset = divmod(int(start_index), n)

    def epoch(e):
        indices = tf.data.Dataset.range(n).shuffle(source.shuffle_buffer, seed=shuffle_seed)
        indices = indices.repeat().skip(e * n).take(n).enumerate()
        pairs = indices.map(
            lambda p, j: (e * n + p, {k: tf.gather(v, j) for k, v in table.items()})
        )
        return pairs.skip(tf.where(e == first_epoch, tf.constant(first_offset, tf.int64), 0))

    # Not Dataset.counter: DYNAMIC sharding does not split it (every worker gets every epoch).
    return tf.data.Dataset.range(first_epoch, MAX_EPOCHS).flat_map(epoch)


def pipeline_config(cfg: config_lib.DataConfig, num_input_pipelines: int):
    """(cfg with this pipeline's batch sizes, job name) for one of several input pipelines.

    One pipeline: (cfg, None), an anonymous job. Several share one job, named
    after the config, and each gets batches of B / num_input_pipelines.

    Raises:
      ValueError: if the labeled batch does not split over the pipelines.
    """
    if num_input_pipelines == 1:
        return cfg, None
    if cfg.train_batch_size % num_input_pipelines:
        raise ValueError(
            f"--train_batch_size={cfg.train_batch_size} is invalid with --data_service_address: "
            f"it must be divisible by the {num_input_pipelines} input pipelines."
        )
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    batch = cfg.train_batch_size // num_input_pipelines
    return dataclasses.replace(cfg, train_batch_size=batch), f"uda_tf_{digest.hexdigest()[:16]}"


def global_partners(batch: dict[str, tf.Tensor], input_pipeline_id: int) -> dict[str, tf.Tensor]:
    """CutMix partners of one input pipeline's batch as indices into the global batch.

    A worker mixes a pipeline's batch within itself; the train step gathers
    the partners' targets over all replicas (pipeline-major, as
    train._replica_batches), where this pipeline's images start at
    input_pipeline_id * its batch size.

    Args:
      batch: a training batch; MIX_PARTNER int32 [n] if CutMix is on.
      input_pipeline_id: this pipeline's index.

    Returns:
      The batch with MIX_PARTNER + input_pipeline_id * n (unchanged without it).
    """
    if common.MIX_PARTNER not in batch or input_pipeline_id == 0:
        return batch
    partner = batch[common.MIX_PARTNER]
    return {**batch, common.MIX_PARTNER: partner + input_pipeline_id * tf.shape(partner)[0]}


def distribute(dataset: tf.data.Dataset, address: str, *, job_name: str | None = None):
    """`dataset` produced by the tf.data service at `address` (DYNAMIC sharding)."""
    return dataset.apply(
        service_lib.distribute(
            processing_mode=service_lib.ShardingPolicy.DYNAMIC,
            service=check_address(address),
            job_name=job_name,
        )
    )


def start_dispatcher(
    *,
    port: int = 0,
    work_dir: str | None = None,
    fault_tolerant_mode: bool | None = None,
    worker_timeout_ms: int | None = None,
) -> service_lib.DispatchServer:
    """Starts a dispatcher; with a work_dir, fault tolerant (a restart recovers its jobs)."""
    fault_tolerant = bool(work_dir) if fault_tolerant_mode is None else fault_tolerant_mode
    if fault_tolerant and not work_dir:
        raise ValueError("--fault_tolerant_mode needs --work_dir (where the journal is kept).")
    config = service_lib.DispatcherConfig(
        port=port,
        work_dir=work_dir or None,
        fault_tolerant_mode=fault_tolerant,
        worker_timeout_ms=worker_timeout_ms,
    )
    return service_lib.DispatchServer(config)


def start_worker(
    dispatcher_address: str,
    *,
    port: int = 0,
    worker_address: str | None = None,
    heartbeat_interval_ms: int | None = None,
) -> service_lib.WorkerServer:
    """Starts a worker of the dispatcher at `dispatcher_address` ([grpc://]host:port)."""
    config = service_lib.WorkerConfig(
        dispatcher_address=check_address(dispatcher_address).split("://", 1)[1],
        worker_address=worker_address or None,
        port=port,
        heartbeat_interval_ms=heartbeat_interval_ms,
    )
    return service_lib.WorkerServer(config)


def serve(server, run_seconds: float) -> None:
    """Blocks while `server` runs: forever (0), or `run_seconds`, then stops it."""
    if run_seconds <= 0:
        server.join()
        return
    deadline = time.monotonic() + run_seconds
    while time.monotonic() < deadline:
        time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))
    server.stop()


def define_flags() -> None:
    flags.DEFINE_enum("role", None, ["dispatcher", "worker"], "Which server to run.")
    flags.DEFINE_integer("port", 0, "Port to serve on (0: any free port, logged).")
    flags.DEFINE_string("work_dir", None, "Dispatcher: where it keeps its journal.")
    flags.DEFINE_bool(
        "fault_tolerant_mode", None, "Dispatcher: journal its state (default: with --work_dir)."
    )
    flags.DEFINE_integer("worker_timeout_ms", None, "Dispatcher: a silent worker is dropped.")
    flags.DEFINE_string("dispatcher_address", None, "Worker: [grpc://]host:port.")
    flags.DEFINE_string(
        "worker_address", None, "Worker: host:port the trainer reaches it at (default localhost)."
    )
    flags.DEFINE_integer("heartbeat_interval_ms", None, "Worker: heartbeat to the dispatcher.")
    flags.DEFINE_string("data_dir", None, "Worker: check that it sees the training data here.")
    flags.DEFINE_float("run_seconds", 0, "Stop after this many seconds (0: run until killed).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.role == "dispatcher":
        server = start_dispatcher(
            port=f.port,
            work_dir=f.work_dir,
            fault_tolerant_mode=f.fault_tolerant_mode,
            worker_timeout_ms=f.worker_timeout_ms,
        )
    else:
        if not f.dispatcher_address:
            raise app.UsageError("--role=worker needs --dispatcher_address.")
        if f.data_dir and not tf.io.gfile.isdir(f.data_dir):
            raise app.UsageError(f"--data_dir={f.data_dir}: not a directory on this worker.")
        server = start_worker(
            f.dispatcher_address,
            port=f.port,
            worker_address=f.worker_address,
            heartbeat_interval_ms=f.heartbeat_interval_ms,
        )
    address = server.target if f.role == "dispatcher" else server._address
    logging.info("tf.data service %s serving at %s.", f.role, address)
    serve(server, f.run_seconds)


if __name__ == "__main__":
    define_flags()
    flags.mark_flag_as_required("role")
    app.run(main)
