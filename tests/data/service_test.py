"""Tests of uda_tf/data/service.py: the splittable order and the streams through a local service.

A dispatcher and workers run in this process on localhost (port 0); the
RandAugment seam is a cheap stand-in (its graph runs on the workers too).
"""

import collections
import dataclasses
import hashlib
import os
import shutil
import tempfile
import time

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tests import golden_values
from uda_tf import common, train
from uda_tf import config as config_lib
from uda_tf.data import fake_cityscapes, service, sources, streams

_ROOT = None
SEED_KEY = "seed"


def setUpModule():
    global _ROOT
    _ROOT = tempfile.mkdtemp()
    fake_cityscapes.generate(
        os.path.join(_ROOT, "cs"), num_train=5, num_val=1, num_extra=2, height=64, width=128
    )


def tearDownModule():
    shutil.rmtree(_ROOT, ignore_errors=True)


def _cfg(**kwargs) -> config_lib.DataConfig:
    defaults = {
        "data_dir": os.path.join(_ROOT, "cs"), "train_batch_size": 2, "crop_height": 48,
        "crop_width": 80, "shuffle_buffer": 8, "unsup_ratio": 1,
    }  # fmt: skip
    return config_lib.DataConfig(**{**defaults, **kwargs})


def _fake_distort(image, mask, *, seed, cfg):
    """A cheap stand-in for RandAugment: invert, move by one pixel, report it."""
    del seed, cfg
    return tf.roll(255 - image, shift=1, axis=1), mask, tf.constant([1.0, 0, -1, 0, 1, 0, 0, 0])


def _digest(batches: list[dict]) -> str:
    h = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            h.update(key.encode())
            h.update(np.ascontiguousarray(batch[key]).tobytes())
    return h.hexdigest()


def _take(ds: tf.data.Dataset, n: int) -> list[dict]:
    return [b for b, _ in zip(ds.as_numpy_iterator(), range(n))]


def _examples(cfg, stream_id: int, *, splittable: bool) -> tuple[tf.data.Dataset, int]:
    """One stream's examples, each with its FILENAME and seed; and the stream's size."""
    labeled = stream_id == common.SUP_STREAM
    source = sources.labeled_source(cfg, "train") if labeled else sources.unlabeled_source(cfg)
    crop = streams.labeled_crop if labeled else streams.unlabeled_views
    kwargs = {"label_table": source.label_table} if labeled else {}

    def with_ids(element, *, seed, cfg, **kw):
        out = crop(element, seed=seed, cfg=cfg, **kw)
        return {**out, SEED_KEY: seed, common.FILENAME: element[common.FILENAME]}

    ds = streams._stream(source, cfg, stream_id, with_ids, splittable=splittable, **kwargs)
    return ds, source.num_examples


def _key(example: dict) -> tuple:
    pixels = hashlib.sha256()
    for name in sorted(set(example) - {SEED_KEY, common.FILENAME}):
        pixels.update(np.ascontiguousarray(example[name]).tobytes())
    return example[common.FILENAME], tuple(example[SEED_KEY]), pixels.hexdigest()


class _ServiceTestCase(tf.test.TestCase, parameterized.TestCase):
    __test__ = False  # A base class: its subclasses' tests run.

    def setUp(self):
        super().setUp()
        real = streams.randaugment_distort
        streams.randaugment_distort = _fake_distort
        self.addCleanup(setattr, streams, "randaugment_distort", real)

    def _cluster(self, num_workers: int):
        """A dispatcher and workers on localhost, stopped when the test ends."""
        dispatcher = service.start_dispatcher(worker_timeout_ms=1000)
        workers = [
            service.start_worker(dispatcher.target, heartbeat_interval_ms=100)
            for _ in range(num_workers)
        ]
        self.addCleanup(dispatcher.stop)
        for worker in workers:
            self.addCleanup(worker.stop)
        deadline = time.monotonic() + 20
        while dispatcher._num_workers() < num_workers and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(dispatcher._num_workers(), num_workers)
        return dispatcher, workers


class LocalInputTest(_ServiceTestCase):
    __test__ = True

    def test_local_batches_are_unchanged(self):
        self.assertEqual(
            _digest(_take(streams.train_dataset(_cfg()), 2)), golden_values.LOCAL_STREAM_SHA256
        )

    @parameterized.parameters(None, 3)
    def test_splittable_order_is_the_local_order(self, global_seed):
        if global_seed is not None:
            tf.random.set_seed(global_seed)  # As main does; it changes the shuffle.
            self.addCleanup(tf.random.set_seed, None)
        source = sources.unlabeled_source(_cfg())  # 7 images, buffer 7.
        n = source.num_examples
        local = source.raw.shuffle(source.shuffle_buffer, seed=11).repeat().enumerate()
        local = [(i, x["filename"]) for i, x in _take(local, 3 * n)]
        split = [
            (i, x["filename"])
            for i, x in _take(service.splittable_order(source, shuffle_seed=11), 3 * n)
        ]
        self.assertEqual(split, local)
        self.assertNotEqual(local[:n], local[n : 2 * n])  # Each epoch is reshuffled.
        resumed = _take(service.splittable_order(source, shuffle_seed=11, start_index=n + 2), n)
        self.assertEqual([(i, x["filename"]) for i, x in resumed], local[n + 2 : 2 * n + 2])

    def test_check_address(self):
        self.assertEqual(service.check_address("localhost:5050"), "grpc://localhost:5050")
        self.assertEqual(service.check_address("grpc://10.0.0.2:5050"), "grpc://10.0.0.2:5050")
        for bad in ("localhost", "http://a:1", "a:99999", ""):
            with self.assertRaisesRegex(ValueError, "--data_service_address"):
                service.check_address(bad)
        with self.assertRaisesRegex(ValueError, "--data_service_address"):
            _cfg(data_service_address="grpc://nohost").validate()

    def test_global_partners(self):
        batch = {common.MIX_PARTNER: tf.constant([1, 0, 2], tf.int32), common.IMAGE: tf.zeros([3])}
        self.assertIs(service.global_partners(batch, 0), batch)
        self.assertAllEqual(service.global_partners(batch, 2)[common.MIX_PARTNER], [7, 6, 8])
        self.assertAllEqual(service.global_partners(batch, 2)[common.IMAGE], tf.zeros([3]))
        plain = {common.IMAGE: tf.zeros([3])}
        self.assertIs(service.global_partners(plain, 1), plain)

    def test_pipeline_config(self):
        cfg = _cfg(train_batch_size=4)
        self.assertEqual(service.pipeline_config(cfg, 1), (cfg, None))
        two, job = service.pipeline_config(cfg, 2)
        self.assertEqual(two.train_batch_size, 2)
        self.assertEqual(service.pipeline_config(cfg, 2)[1], job)  # Same config, same job.
        self.assertNotEqual(service.pipeline_config(_cfg(train_batch_size=4, seed=1), 2)[1], job)
        with self.assertRaisesRegex(ValueError, "divisible by the 3 input pipelines"):
            service.pipeline_config(cfg, 3)


class ServiceTest(_ServiceTestCase):
    __test__ = True

    @parameterized.parameters(common.SUP_STREAM, common.UNSUP_STREAM)
    def test_an_epoch_through_two_workers_is_the_local_epoch(self, stream_id):
        dispatcher, _ = self._cluster(2)
        cfg = _cfg()
        ds, n = _examples(cfg, stream_id, splittable=False)
        local = [_key(e) for e in _take(ds, 3 * n)]
        by_seed = {k[1]: k for k in local}
        epoch0 = {k[1] for k in local[:n]}
        ds, _ = _examples(cfg, stream_id, splittable=True)
        got, first = [], []
        for example in _take(service.distribute(ds, dispatcher.target), 12 * n):
            key = _key(example)
            got.append(key)
            if key[1] in epoch0:
                first.append(key)
            if len(first) == n:
                break
        # Epoch 0 as a multiset of (file, seed, pixels); the order may differ.
        self.assertEqual(collections.Counter(first), collections.Counter(local[:n]))
        for key in got:  # Other epochs: each example is the local one of its seed.
            if key[1] in by_seed:
                self.assertEqual(key, by_seed[key[1]])
        self.assertLen(set(got), len(got))

    def test_a_stopped_worker_loses_its_epoch_and_training_goes_on(self):
        dispatcher, workers = self._cluster(2)
        cfg = _cfg()
        ds, n = _examples(cfg, common.SUP_STREAM, splittable=False)
        by_seed = {k[1]: k for k in map(_key, _take(ds, 40 * n))}
        ds, _ = _examples(cfg, common.SUP_STREAM, splittable=True)
        iterator = service.distribute(ds, dispatcher.target).as_numpy_iterator()
        before = [_key(next(iterator)) for _ in range(3 * n)]
        workers[1].stop()
        deadline = time.monotonic() + 60
        after = []
        while len(after) < 4 * n and time.monotonic() < deadline:
            after.append(_key(next(iterator)))
        self.assertLen(after, 4 * n)  # The other worker keeps the trainer fed.
        seen = before + after
        # DYNAMIC is at most once: nothing twice; the stopped worker's epoch
        # is lost, not reassigned. Every example is the local one of its seed.
        self.assertLen({k[1] for k in seen}, len(seen))
        for key in seen:
            self.assertEqual(key, by_seed.get(key[1], key))

    def test_cutmix_step_seeds_are_used_once_over_two_workers(self):
        real = streams.mix.cutmix_batch
        streams.mix.cutmix_batch = lambda batch, *, seed: {**batch, "mix_seed": seed}
        self.addCleanup(setattr, streams.mix, "cutmix_batch", real)
        dispatcher, _ = self._cluster(2)
        cfg = _cfg(unsup_mix="cutmix", unsup_ratio=2)
        local = [tuple(b["mix_seed"]) for b in _take(streams.train_dataset(cfg), 30)]
        ds = service.distribute(streams.train_dataset(cfg, splittable=True), dispatcher.target)
        iterator = ds.as_numpy_iterator()
        remote = [tuple(next(iterator)["mix_seed"])]
        time.sleep(3)  # Both workers fill their buffers; reads then take turns.
        remote += [tuple(next(iterator)["mix_seed"]) for _ in range(15)]
        # Each worker numbers batches from one shared range: no draw twice.
        self.assertLen(set(remote), len(remote))
        self.assertContainsSubset(remote, local)

    def test_mirrored_train_input_is_the_local_one(self):
        # One worker: the service's batches are the local ones, bit for bit.
        dispatcher, _ = self._cluster(1)
        base = config_lib.Config(data=_cfg())
        remote_cfg = dataclasses.replace(
            base, data=dataclasses.replace(base.data, data_service_address=dispatcher.target)
        )
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        local, remote = (iter(train.train_input(c, strategy)) for c in (base, remote_cfg))
        for _ in range(2):
            a, b = next(local), next(remote)
            for key in a:
                for x, y in zip(
                    strategy.experimental_local_results(a[key]),
                    strategy.experimental_local_results(b[key]),
                    strict=True,
                ):
                    self.assertAllEqual(x, y, msg=key)

    def test_input_pipelines_share_one_job(self):
        dispatcher, _ = self._cluster(1)
        cfg = _cfg(train_batch_size=2, unsup_ratio=0, data_service_address=dispatcher.target)
        pipelines = [
            train._service_dataset(cfg, num_input_pipelines=2).as_numpy_iterator() for _ in range(2)
        ]
        got = [_digest([next(p)]) for p in pipelines for _ in range(2)]
        # One job: the pipelines share its batches of B / 2 (with a job each,
        # both would get the same ones); one worker makes them in local order.
        local = _take(streams.train_dataset(dataclasses.replace(cfg, train_batch_size=1)), 30)
        self.assertContainsSubset(got, [_digest([b]) for b in local])
        self.assertLen(set(got), 4)


if __name__ == "__main__":
    tf.test.main()
