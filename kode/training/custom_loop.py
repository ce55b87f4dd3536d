"""The training loop around ``strategy.run`` for strategies ``model.fit`` cannot drive.

Keras 3.15's ``model.fit`` fails under ``MultiWorkerMirroredStrategy`` even for a Dense model
(keras#20585); :func:`fit_distributed` and :func:`evaluate_distributed` do what ``fit`` and
``evaluate`` do, with the loss of a step the mean over the global batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from kode.compat import all_layers
from kode.errors import KodeError
from kode.training.resume import skip_epochs


def _per_replica_sums(model, loss_fn, x, y, training: bool):
    probs = model(x, training=training)
    per_example = loss_fn(y, probs)
    predicted = tf.argmax(probs, axis=-1, output_type=tf.int32)
    correct = tf.reduce_sum(tf.cast(tf.equal(predicted, tf.cast(y, tf.int32)), tf.float32))
    return per_example, correct


def _batches(distributed, dataset: tf.data.Dataset):
    """Iterate a distributed dataset for exactly its known number of batches.

    Running into the end of a multi-worker iterator costs a cross-worker "any data left?"
    round, which was measured to stall 20–60 s on localhost; with a known cardinality every
    worker stops after the same number of steps without it.
    """
    steps = int(dataset.cardinality())
    iterator = iter(distributed)
    if steps < 0:
        yield from iterator
        return
    for _ in range(steps):
        yield next(iterator)


def _stream(distributed, dataset: tf.data.Dataset, start: int):
    """The batches of pass after pass over ``distributed`` (one iterator per pass, so each
    pass draws its own shuffle, as in ``fit`` over ``dataset.repeat()``), from batch ``start``
    of that stream on: the passes before it only create their iterator, the batches of the
    current pass before it are read and dropped."""
    passes, offset = divmod(start, int(dataset.cardinality()))
    skip_epochs(distributed, passes)
    while True:
        for batch in _batches(distributed, dataset):
            if offset:
                offset -= 1
                continue
            yield batch


def fit_distributed(
    model: keras.Model,
    train_ds: tf.data.Dataset,
    *,
    epochs: int,
    strategy: tf.distribute.Strategy,
    validation_data: tf.data.Dataset | None = None,
    initial_epoch: int = 0,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int = 0,
    steps_per_epoch: int | None = None,
) -> dict:
    """Train a compiled classifier (sparse labels, probability outputs) with a custom loop
    around ``strategy.run``: what ``model.fit`` does, for strategies ``fit`` cannot drive.

    The loss of a step is the mean over the *global* batch: each replica divides its sum by
    the all-reduced example count, and the optimizer sums the replicas' gradients. So the
    ragged last batch (split unevenly between replicas) is weighted exactly as on one device.
    Logs (``loss``, ``accuracy``, ``val_*``) are example-weighted epoch means, as in ``fit``.
    ``steps_per_epoch`` (as in ``fit``; None: one pass of ``train_ds``): epoch k trains on
    batches [k·S, (k+1)·S) of the stream of passes over ``train_ds``, each pass shuffled anew,
    also when resumed at ``initial_epoch``. Returns the history dict.
    """
    optimizer = model.optimizer
    loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction=None)
    dist_train = strategy.experimental_distribute_dataset(train_ds)
    dist_val = (strategy.experimental_distribute_dataset(validation_data)
                if validation_data is not None else None)

    def replica_train(x, y):
        context = tf.distribute.get_replica_context()
        count = tf.cast(tf.shape(y)[0], tf.float32)
        global_count = context.all_reduce(tf.distribute.ReduceOp.SUM, count)
        with tf.GradientTape() as tape:
            per_example, correct = _per_replica_sums(model, loss_fn, x, y, True)
            loss = tf.reduce_sum(per_example) / global_count
            scaled = optimizer.scale_loss(loss)  # loss scaling under mixed_float16
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return tf.reduce_sum(per_example), correct, count

    def replica_test(x, y):
        per_example, correct = _per_replica_sums(model, loss_fn, x, y, False)
        return tf.reduce_sum(per_example), correct, tf.cast(tf.shape(y)[0], tf.float32)

    def make_step(fn, distributed):
        # Traced once for all batches: the distributed dataset's spec leaves the batch size
        # unknown, so the ragged last batch does not trace the step a second time.
        @tf.function(input_signature=distributed.element_spec)
        def step(x, y):
            results = strategy.run(fn, args=(x, y))
            return [strategy.reduce(tf.distribute.ReduceOp.SUM, r, axis=None) for r in results]
        return step

    test_step = make_step(replica_test, dist_val) if dist_val is not None else None
    steps = int(train_ds.cardinality())
    if steps_per_epoch is not None:
        if steps < 0:
            raise KodeError("steps_per_epoch needs a training dataset of known length "
                            "(cardinality); this one has none")
        steps = int(steps_per_epoch)
        stream = _stream(dist_train, train_ds, initial_epoch * steps)
    callback_list = keras.callbacks.CallbackList(
        list(callbacks), add_history=True, add_progbar=verbose != 0, model=model,
        verbose=verbose, epochs=epochs, steps=steps if steps >= 0 else None,
    )
    model.stop_training = False
    callback_list.on_train_begin()
    if steps_per_epoch is None:
        skip_epochs(dist_train, initial_epoch)
    train_step, traced_modes = None, None
    for epoch in range(initial_epoch, epochs):
        # The gradient guard may switch stages to 'checkpoint' (fallback): retrace then.
        modes = tuple(getattr(la, "gradient", None) for la in all_layers(model))
        if modes != traced_modes:
            train_step, traced_modes = make_step(replica_train, dist_train), modes
        callback_list.on_epoch_begin(epoch)
        totals = np.zeros(3)
        batches = (_batches(dist_train, train_ds) if steps_per_epoch is None
                   else itertools.islice(stream, steps))
        for batch, (x, y) in enumerate(batches):
            callback_list.on_train_batch_begin(batch)
            sums = np.array([float(v) for v in train_step(x, y)])
            totals += sums
            callback_list.on_train_batch_end(batch, {"loss": sums[0] / sums[2]})
        logs = {"loss": totals[0] / totals[2], "accuracy": totals[1] / totals[2]}
        if dist_val is not None:
            val = np.zeros(3)
            for x, y in _batches(dist_val, validation_data):
                val += np.array([float(v) for v in test_step(x, y)])
            logs.update(val_loss=val[0] / val[2], val_accuracy=val[1] / val[2])
        callback_list.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callback_list.on_train_end()
    return dict(model.history.history)


def evaluate_distributed(model: keras.Model, dataset: tf.data.Dataset,
                         strategy: tf.distribute.Strategy) -> dict:
    """Example-weighted test loss and accuracy with ``strategy.run`` (``model.evaluate`` has
    the same multi-worker problem as ``fit``)."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction=None)

    distributed = strategy.experimental_distribute_dataset(dataset)

    @tf.function(input_signature=distributed.element_spec)  # one trace, as in fit_distributed
    def step(x, y):
        def replica(x, y):
            per_example, correct = _per_replica_sums(model, loss_fn, x, y, False)
            return tf.reduce_sum(per_example), correct, tf.cast(tf.shape(y)[0], tf.float32)

        results = strategy.run(replica, args=(x, y))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, r, axis=None) for r in results]

    totals = np.zeros(3)
    for x, y in _batches(distributed, dataset):
        totals += np.array([float(v) for v in step(x, y)])
    return {"loss": totals[0] / totals[2], "accuracy": totals[1] / totals[2]}
