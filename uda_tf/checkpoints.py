"""Checkpoints that survive crashes: the newest one that reads back whole, broken ones set aside.

A checkpoint model_dir/ckpt-<step> is its files ckpt-<step>.index and
ckpt-<step>.data-00000-of-00001. TF writes them so that a process killed
while saving never damages an older one: the tensors go to ckpt-<step>_temp/
and are renamed into place, the index is written, and only then does
`tf.train.CheckpointManager` name the new checkpoint in model_dir/checkpoint
(the state file, replaced by a rename) and delete the ones beyond --max_save.
A kill can therefore leave the NEWEST checkpoint incomplete (data without an
index, a short index) or an old one half deleted, never the previous one
broken; a full disk, a bad copy or a bad sector can break any.

So nothing here trusts the state file:
- `newest_intact` lists the ckpt-<step> files itself and reads back every
  tensor (checksummed) of the newest checkpoint, then of the one before,
  until one reads back whole; each one skipped is logged as a warning with
  its reason. It writes nothing (evaluation, export).
- `recover` (the process that trains) also moves the skipped checkpoints'
  files into model_dir/broken/ and rewrites the state file from the
  checkpoints that remain, so that the manager's rotation counts only real
  checkpoints (an intact one is never deleted because a broken one was
  counted) and a new ckpt-<step> never mixes with a broken one's files.
- a model_dir holding checkpoint files of which none reads back whole is an
  error that lists them, never a fresh start from step 0.
"""

import os
import re

import tensorflow as tf
from absl import logging

CHECKPOINT_NAME = "ckpt"
STATE_FILE = "checkpoint"
BROKEN_DIR = "broken"
_FILE = re.compile(rf"^{CHECKPOINT_NAME}-(\d+)\.(index|data-\d{{5}}-of-\d{{5}})$")


def checkpoint_files(model_dir: str) -> dict[int, list[str]]:
    """step -> the names of the files of model_dir/ckpt-<step>, whole or not (a listing)."""
    if not tf.io.gfile.isdir(model_dir):
        return {}
    files = {}
    for name in sorted(tf.io.gfile.listdir(model_dir)):
        match = _FILE.match(name)
        if match:
            files.setdefault(int(match.group(1)), []).append(name)
    return files


def problem(path: str) -> str | None:
    """Why the checkpoint at `path` (a prefix) does not read back whole; None if it does.

    Reads every tensor: the reader checks each one's size and checksum.
    """
    index = path + ".index"
    if not tf.io.gfile.exists(index):
        return f"{index} is missing"
    try:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as error:  # noqa: BLE001 (whatever fails to read back is broken)
        lines = str(error).strip().splitlines() or [""]
        return f"{type(error).__name__}: {lines[0]}"
    return None


def _scan(model_dir: str) -> tuple[str | None, list[tuple[int, str]], dict[int, list[str]]]:
    """(newest intact path or None, [(step, reason)] of the newer ones skipped, files).

    Raises:
      ValueError: listing them, if model_dir holds checkpoint files but none reads back whole.
    """
    files = checkpoint_files(model_dir)
    skipped = []
    for step in sorted(files, reverse=True):
        path = os.path.join(model_dir, f"{CHECKPOINT_NAME}-{step}")
        reason = problem(path)
        if reason is None:
            return path, skipped, files
        logging.warning("Skipping checkpoint %s: it does not read back whole (%s).", path, reason)
        skipped.append((step, reason))
    if skipped:
        listed = ", ".join(f"{CHECKPOINT_NAME}-{step} ({reason})" for step, reason in skipped)
        raise ValueError(
            f"--model_dir={model_dir}: no checkpoint reads back whole: {listed}. Restore them "
            f"from a copy, or move them out of model_dir to start again from step 0."
        )
    return None, skipped, files


def newest_intact(model_dir: str) -> str | None:
    """The newest checkpoint of model_dir that reads back whole; writes nothing.

    Returns:
      Its path (model_dir/ckpt-<step>), or None if model_dir holds no
      checkpoint files. Each newer checkpoint skipped is logged as a warning.

    Raises:
      ValueError: listing them, if there are checkpoint files but none reads back whole.
    """
    return _scan(model_dir)[0]


def recover(model_dir: str) -> str | None:
    """`newest_intact`, for the process that trains in model_dir: it also repairs model_dir.

    The files of the checkpoints skipped are moved into model_dir/broken/,
    and the state file is rewritten to name the checkpoints that remain
    (with a warning if it named others, or could not be read).

    Returns:
      The path of the checkpoint to restore, or None if there is none (a fresh run).

    Raises:
      ValueError: listing them, if there are checkpoint files but none reads back whole.
    """
    path, skipped, files = _scan(model_dir)
    for step, _ in skipped:
        _set_aside(model_dir, files.pop(step))
    if path is not None:
        _write_state(model_dir, sorted(files), latest=os.path.basename(path))
    return path


def _set_aside(model_dir: str, names: list[str]) -> None:
    """Moves the files `names` of model_dir into model_dir/broken/ (never over another)."""
    broken = os.path.join(model_dir, BROKEN_DIR)
    tf.io.gfile.makedirs(broken)
    for name in names:
        target, copy = os.path.join(broken, name), 0
        while tf.io.gfile.exists(target):
            copy += 1
            target = os.path.join(broken, f"{name}.{copy}")
        tf.io.gfile.rename(os.path.join(model_dir, name), target)
    logging.warning("Moved the broken checkpoint files %s into %s.", ", ".join(names), broken)


def _recorded(model_dir: str) -> tuple[str, ...] | None:
    """(latest, *all) checkpoint names of the state file; None if it is missing or unreadable."""
    try:
        state = tf.train.get_checkpoint_state(model_dir)
    except ValueError:  # A state file without model_checkpoint_path.
        return None
    if state is None:
        return None
    paths = [state.model_checkpoint_path, *state.all_model_checkpoint_paths]
    return tuple(os.path.basename(p) for p in paths)


def _write_state(model_dir: str, steps: list[int], *, latest: str) -> None:
    """Replaces model_dir/checkpoint with one that names ckpt-<step> for `steps`, oldest first.

    Paths are relative (model_dir can be moved); timestamps are the files'
    times, so that CheckpointManager keeps rotating these checkpoints.
    """
    names = [f"{CHECKPOINT_NAME}-{step}" for step in steps]
    recorded = _recorded(model_dir)
    if recorded != (latest, *names):
        logging.warning(
            "%s named %s; rewritten from the checkpoint files: %s, latest %s.",
            os.path.join(model_dir, STATE_FILE),
            ", ".join(recorded) if recorded else "nothing readable",
            ", ".join(names),
            latest,
        )
    times = []
    for name in names:
        files = tf.io.gfile.glob(os.path.join(model_dir, name + ".*"))
        times.append(max(tf.io.gfile.stat(f).mtime_nsec for f in files) / 1e9)
    lines = [f'model_checkpoint_path: "{latest}"']
    lines += [f'all_model_checkpoint_paths: "{name}"' for name in names]
    lines += [f"all_model_checkpoint_timestamps: {t!r}" for t in times]
    lines.append(f"last_preserved_timestamp: {min(times) - 1.0!r}")
    write_atomically(os.path.join(model_dir, STATE_FILE), "\n".join(lines) + "\n")


def write_atomically(path: str, text: str) -> None:
    """Writes `text` to `path` beside it, then renames: readers see the old file or the new one."""
    temp = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(temp, "w") as f:
        f.write(text)
    tf.io.gfile.rename(temp, path, overwrite=True)
