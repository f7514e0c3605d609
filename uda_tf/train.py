"""The training driver: strategy, model, checkpoints, and the loop.

One `UdaModel.train_step` serves two loops:
- one replica (`--strategy=default`): Keras `fit`, `steps_per_execution` =
  --iterations, one epoch = --save_steps steps;
- several replicas (mirrored, multi_worker, tpu): a custom loop that runs the
  train step through `strategy.run` inside a tf.function. Keras 3.15's fit
  fails under MultiWorkerMirroredStrategy (tensorflow/tensorflow#72388), and
  under MirroredStrategy with steps_per_execution > 1 it stops with the
  "must feed a value for placeholder" error of keras-team/keras#19246.
Both call the same Keras callbacks (progress bar, checkpoints, TensorBoard,
CSV), so a run looks the same either way.

Checkpoints (`tf.train.CheckpointManager`, model_dir/ckpt-<step>) hold the
UdaModel (network, EMA network), the optimizer (its step counts the steps
done) and, under the key `ema_network`, the network that evaluation and
export use. Restarting the same command resumes from the newest checkpoint
that reads back whole (uda_tf/checkpoints.py: broken ones are skipped with a
warning and moved into model_dir/broken/), and the input streams continue at
the examples of the restored step, so that a resumed run is the run that was
interrupted (with --deterministic, bit for bit).
"""

import json
import math
import os
import tempfile
from collections.abc import Callable

import keras
import tensorflow as tf
from absl import logging

from uda_tf import checkpoints, models, schedules
from uda_tf import config as config_lib
from uda_tf.callbacks import training_callbacks, truncate_logs
from uda_tf.data import service, streams
from uda_tf.uda_model import UdaModel

FLAGS_FILE = "FLAGS.json"
CHECKPOINT_NAME = checkpoints.CHECKPOINT_NAME


def create_strategy(cfg: config_lib.TrainConfig) -> tf.distribute.Strategy:
    """The tf.distribute strategy of --strategy (--use_tpu means tpu)."""
    if cfg.strategy == "default":
        return tf.distribute.get_strategy()
    if cfg.strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    if cfg.strategy == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu=cfg.tpu or cfg.master, zone=cfg.tpu_zone, project=cfg.gcp_project
    )
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's files: all but the non-chief workers do."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (task_type == "worker" and task_id == 0)


def check_replicas(cfg: config_lib.Config, strategy: tf.distribute.Strategy) -> None:
    """Raises ValueError unless the global batch splits evenly over the replicas."""
    replicas = strategy.num_replicas_in_sync
    if cfg.data.train_batch_size % replicas:
        raise ValueError(
            f"--train_batch_size={cfg.data.train_batch_size} is invalid: the global labeled "
            f"batch must be divisible by the {replicas} replicas of --strategy="
            f"{cfg.train.strategy}."
        )


def make_model_dir(model_dir: str) -> None:
    """Creates model_dir if needed; ValueError if it cannot be (not writable)."""
    try:
        tf.io.gfile.makedirs(model_dir)
    except (OSError, tf.errors.OpError) as error:
        raise ValueError(f"--model_dir={model_dir} is not writable: {error}") from error


def write_config(cfg: config_lib.Config, model_dir: str) -> str:
    """Writes model_dir/FLAGS.json (beside, then renamed); ValueError if model_dir is not writable."""
    path = os.path.join(model_dir, FLAGS_FILE)
    try:
        tf.io.gfile.makedirs(model_dir)
        checkpoints.write_atomically(
            path, json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n"
        )
    except (OSError, tf.errors.OpError) as error:
        raise ValueError(f"--model_dir={model_dir} is not writable: {error}") from error
    return path


def read_config(model_dir: str) -> config_lib.Config:
    """The Config of a run, from model_dir/FLAGS.json."""
    path = os.path.join(model_dir, FLAGS_FILE)
    if not tf.io.gfile.exists(path):
        raise ValueError(f"--model_dir={model_dir} has no {FLAGS_FILE}: it is not a uda_tf run.")
    with tf.io.gfile.GFile(path) as f:
        return config_lib.Config.from_dict(json.load(f))


def latest_checkpoint(model_dir: str) -> str:
    """The newest checkpoint that reads back whole (`checkpoints.newest_intact`).

    Raises:
      ValueError: naming model_dir if it holds no checkpoint, or listing its
        checkpoints if none reads back whole.
    """
    path = checkpoints.newest_intact(model_dir)
    if path is None:
        raise ValueError(f"--model_dir={model_dir} holds no checkpoint (train first).")
    return path


def checkpoint_step(path: str) -> int:
    """The global step of a checkpoint written here (model_dir/ckpt-<step>)."""
    return int(path.rsplit("-", 1)[-1])


def mixed_precision_policy(cfg: config_lib.TrainConfig) -> str:
    """The Keras policy of --mixed_precision: mixed_float16 on GPUs,
    mixed_bfloat16 on TPUs and on CPU-only machines (CPUs have no fast float16
    kernels; oneDNN runs bfloat16 on AVX512-BF16 and AMX units)."""
    if cfg.use_tpu or cfg.strategy == "tpu" or not tf.config.list_logical_devices("GPU"):
        return "mixed_bfloat16"
    return "mixed_float16"


def build_uda_model(cfg: config_lib.Config, strategy: tf.distribute.Strategy):
    """Builds the network, the UdaModel and its (built) optimizer in the strategy's scope.

    Returns:
      (model, optimizer); the optimizer is a LossScaleOptimizer under the
      mixed_float16 policy.
    """
    synchronized = cfg.model.synchronized_bn and strategy.num_replicas_in_sync > 1
    with strategy.scope():
        network = models.build_model_from_config(cfg.model, synchronized_bn=synchronized)
        model = UdaModel(
            network,
            uda=cfg.uda,
            moving_average_decay=cfg.train.moving_average_decay,
            weight_decay_rate=cfg.train.weight_decay_rate,
            teacher_network=load_teacher(cfg) if cfg.uda.uda_target == "teacher" else None,
        )
        optimizer = schedules.build_optimizer(
            learning_rate=cfg.train.learning_rate,
            train_steps=cfg.train.train_steps,
            warmup_steps=cfg.train.warmup_steps,
        )
        if keras.mixed_precision.global_policy().name == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(network.trainable_variables)
    if cfg.train.verbose:
        for variable in network.weights:
            logging.info("%s %s %s", variable.path, variable.shape, variable.dtype)
    logging.info(
        "%s: %d parameters, %d replicas.",
        network.name,
        network.count_params(),
        strategy.num_replicas_in_sync,
    )
    return model, optimizer


def checkpoint_manager(model, optimizer, directory: str, max_save: int):
    """A CheckpointManager of the model, its optimizer and the EMA network."""
    checkpoint = tf.train.Checkpoint(
        model=model, optimizer=optimizer, ema_network=model.ema_network
    )
    return tf.train.CheckpointManager(
        checkpoint, directory, max_to_keep=max_save, checkpoint_name=CHECKPOINT_NAME
    )


def load_inference_model(model_dir: str, checkpoint_path: str | None = None) -> keras.Model:
    """The network with the EMA weights of the newest intact checkpoint of a run.

    Args:
      model_dir: a training directory (FLAGS.json and checkpoints).
      checkpoint_path: the checkpoint to load; default `latest_checkpoint(model_dir)`.

    Returns:
      A keras.Model: float32 images [N, H, W, 3] in [0, 255] -> float32
      logits [N, H, W, K], built from FLAGS.json (plain batch norm, no
      backbone weights file needed).

    Raises:
      ValueError: naming model_dir if it has no FLAGS.json or no intact checkpoint.
    """
    cfg = read_config(model_dir)
    path = checkpoint_path or latest_checkpoint(model_dir)
    network = models.build_model_from_config(
        cfg.model, synchronized_bn=False, backbone_weights=None
    )
    status = tf.train.Checkpoint(ema_network=network).restore(path)
    status.expect_partial().assert_existing_objects_matched()
    logging.info("Loaded the EMA network of %s (step %d).", path, checkpoint_step(path))
    return network


def load_teacher(cfg: config_lib.Config) -> keras.Model:
    """The fixed teacher of --uda_target=teacher: `load_inference_model(--uda_teacher_dir)`.

    Raises:
      ValueError: naming --uda_teacher_dir when it is this run's own model_dir,
        is not a finished run (no FLAGS.json, no intact checkpoint), or
        predicts another number of classes.
    """
    teacher_dir = cfg.uda.uda_teacher_dir
    if cfg.train.model_dir and os.path.abspath(teacher_dir) == os.path.abspath(cfg.train.model_dir):
        raise ValueError(
            f"--uda_teacher_dir={teacher_dir} is this run's --model_dir: the teacher must be "
            "another, finished run."
        )
    try:
        teacher_cfg = read_config(teacher_dir)
        if teacher_cfg.model.num_classes != cfg.model.num_classes:
            raise ValueError(
                f"its network predicts {teacher_cfg.model.num_classes} classes, this run "
                f"--num_classes={cfg.model.num_classes}"
            )
        network = load_inference_model(teacher_dir)
    except ValueError as error:
        raise ValueError(f"--uda_teacher_dir={teacher_dir}: {error}") from None
    network.trainable = False
    return network


def _replica_batches(batch: dict, ctx: tf.distribute.InputContext) -> dict:
    """This input pipeline's replica parts of a global batch: [k, ...] per key.

    Every key is cut along its batch dimension into num_replicas_in_sync equal
    parts (labeled B/n, unlabeled rB/n); replica i gets part i, so that n
    replicas see exactly the global batch one replica would.
    """
    n = ctx.num_replicas_in_sync
    k = n // ctx.num_input_pipelines
    first = ctx.input_pipeline_id * k
    parts = {}
    for key, value in batch.items():
        shape = value.shape[1:].as_list()
        if None in shape:
            new_shape = tf.concat([[n, -1], tf.shape(value)[1:]], axis=0)
        else:
            new_shape = [n, -1] + shape
        parts[key] = tf.reshape(value, new_shape)[first : first + k]
    return parts


def _service_dataset(
    cfg: config_lib.DataConfig, num_input_pipelines: int, start_step: int = 0
) -> tf.data.Dataset:
    """The training stream made by the tf.data service's workers (uda_tf/data/service.py)."""
    pipeline_cfg, job_name = service.pipeline_config(cfg, num_input_pipelines)
    # The pipelines share one job of batches of B / pipelines: `start_step` global
    # steps consumed start_step * pipelines of them.
    start_step *= num_input_pipelines
    dataset = streams.train_dataset(pipeline_cfg, splittable=True, start_step=start_step)
    return service.distribute(dataset, cfg.data_service_address, job_name=job_name)


def train_input(cfg: config_lib.Config, strategy: tf.distribute.Strategy, *, start_step: int = 0):
    """The training batches from step `start_step` on: a tf.data.Dataset, or a distributed one.

    The first batch is the one of step `start_step` of the stream that starts
    at step 0 (a resumed run continues the interrupted one's examples).

    With several replicas every input pipeline builds the same global-batch
    stream (stateless per-example seeds) and keeps its replicas' parts. With
    --data_service_address the service's workers make the batches; input
    pipelines share its job, each gets its own batches (B / pipelines) and
    keeps all of them.
    """
    address = cfg.data.data_service_address
    if strategy.num_replicas_in_sync == 1:
        if address:
            return _service_dataset(cfg.data, 1, start_step)
        return streams.train_dataset(cfg.data, start_step=start_step)

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        parts_ctx = ctx
        if address:
            dataset = _service_dataset(cfg.data, ctx.num_input_pipelines, start_step)
            dataset = dataset.map(lambda b: service.global_partners(b, ctx.input_pipeline_id))
            replicas = ctx.num_replicas_in_sync // ctx.num_input_pipelines
            parts_ctx = tf.distribute.InputContext(1, 0, replicas)  # The whole batch is ours.
        else:
            dataset = streams.train_dataset(cfg.data, start_step=start_step)
        dataset = dataset.map(lambda b: _replica_batches(b, parts_ctx)).unbatch()
        return dataset.prefetch(tf.data.AUTOTUNE)

    return strategy.distribute_datasets_from_function(dataset_fn)


def _custom_loop(
    model,
    dataset,
    *,
    callbacks,
    steps_per_execution,
    epochs,
    initial_epoch,
    steps_per_epoch,
    verbose,
) -> None:
    """`fit` for several replicas: `strategy.run(train_step)` in a tf.function."""
    iterator = iter(dataset)

    @tf.function
    def train_function(iterator):
        if steps_per_execution > 1:
            for _ in tf.range(steps_per_execution - 1):
                model.distributed_train_step(next(iterator))
        return model.distributed_train_step(next(iterator))

    callback_list = keras.callbacks.CallbackList(
        callbacks,
        add_history=True,
        add_progbar=verbose != 0,
        verbose=verbose,
        epochs=epochs,
        steps=steps_per_epoch,
        model=model,
    )
    model.stop_training = False
    callback_list.on_train_begin()
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        callback_list.on_epoch_begin(epoch)
        logs = {}
        for begin in range(0, steps_per_epoch, steps_per_execution):
            callback_list.on_train_batch_begin(begin)
            logs = {k: float(v) for k, v in train_function(iterator).items()}
            callback_list.on_train_batch_end(begin + steps_per_execution - 1, logs)
            if model.stop_training:
                break
        callback_list.on_epoch_end(epoch, dict(logs))
        if model.stop_training:
            break
    callback_list.on_train_end()


def train(
    cfg: config_lib.Config,
    strategy: tf.distribute.Strategy,
    model,
    optimizer,
    *,
    verbose: int = 2,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Trains from the newest intact checkpoint (if any) to --train_steps.

    Args:
      cfg: the run's config.
      strategy: the strategy the model was built under.
      model, optimizer: from `build_uda_model`.
      verbose: Keras progress-bar verbosity (1 = bar, 2 = a line per epoch).
      on_ready: called once every check has passed (checkpoint restored,
        input and callbacks built), just before the first step; not called
        when there is nothing to train. main writes the run's files there.

    Raises:
      ValueError: model_dir's checkpoints are all broken or do not fit the
        model, or bad input files (naming them).
    """
    chief = is_chief(strategy)
    # Non-chief workers take part in saving (collectively) into a scratch directory.
    directory = cfg.train.model_dir if chief else tempfile.mkdtemp(prefix="uda_worker_ckpt_")
    try:
        _train(
            cfg,
            strategy,
            model,
            optimizer,
            directory,
            chief=chief,
            verbose=verbose,
            on_ready=on_ready,
        )
    finally:
        if not chief:
            tf.io.gfile.rmtree(directory)


def _restore(checkpoint: tf.train.Checkpoint, path: str, strategy, model_dir: str) -> None:
    """Restores `path` (read back whole); ValueError if it does not fit the model."""
    try:
        with strategy.scope():
            checkpoint.restore(path).assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as error:
        raise ValueError(
            f"--model_dir={model_dir}: {path} does not fit this run's model and optimizer; "
            f"resume with the same model flags or use another --model_dir. ({error})"
        ) from error


def _steps_per_execution(train_cfg: config_lib.TrainConfig, remaining: int) -> int:
    """--iterations, or the largest divisor of it that also divides --save_steps and `remaining`."""
    steps = math.gcd(train_cfg.iterations, train_cfg.save_steps, remaining)
    if steps != train_cfg.iterations:
        logging.info(
            "Running %d steps per execution: --iterations=%d does not divide --save_steps=%d "
            "and the %d remaining steps.",
            steps,
            train_cfg.iterations,
            train_cfg.save_steps,
            remaining,
        )
    return steps


def _train(
    cfg, strategy, model, optimizer, directory: str, *, chief: bool, verbose: int, on_ready
) -> None:
    train_cfg = cfg.train
    model_dir = train_cfg.model_dir
    # The chief sets broken checkpoints aside and rewrites the state file that
    # the manager then reads; the other workers only read.
    restore_path = checkpoints.recover(model_dir) if chief else checkpoints.newest_intact(model_dir)
    manager = checkpoint_manager(model, optimizer, directory, train_cfg.max_save)
    if restore_path:
        _restore(manager.checkpoint, restore_path, strategy, model_dir)
    start = int(optimizer.iterations.numpy())
    remaining = train_cfg.train_steps - start
    if restore_path:
        logging.info("Restored %s: step %d, %d steps to go.", restore_path, start, remaining)
    if remaining <= 0:
        logging.info("Step %d >= --train_steps=%d: nothing to train.", start, train_cfg.train_steps)
        return
    steps_per_epoch = train_cfg.save_steps
    steps_per_execution = _steps_per_execution(train_cfg, remaining)
    initial_epoch = start // steps_per_epoch
    epochs = initial_epoch + math.ceil(remaining / steps_per_epoch)
    model.compile(
        optimizer=optimizer,
        steps_per_execution=steps_per_execution,
        jit_compile=train_cfg.jit_compile,
    )
    callbacks = training_callbacks(cfg, model, manager, chief=chief)
    dataset = train_input(cfg, strategy, start_step=start)
    if chief:  # Log rows past the restored step are of a future that was lost.
        truncate_logs(model_dir, step=start, first_epoch=initial_epoch)
    if on_ready is not None:
        on_ready()
    verbose = verbose if chief else 0
    loop_args = {
        "epochs": epochs,
        "initial_epoch": initial_epoch,
        "steps_per_epoch": steps_per_epoch,
    }
    if strategy.num_replicas_in_sync == 1:
        model.fit(dataset, callbacks=callbacks, verbose=verbose, shuffle=False, **loop_args)
    else:
        _custom_loop(
            model,
            dataset,
            callbacks=callbacks,
            verbose=verbose,
            steps_per_execution=steps_per_execution,
            **loop_args,
        )
