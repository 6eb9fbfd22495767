"""The robustness monitor of training runs (rat_tf.callbacks.RobustnessMonitor)."""

import time

import keras
import pytest

from rat_tf import callbacks, models, trainers


class _Sleep(keras.callbacks.Callback):
    """Stands for a V search made by another callback at the start of every epoch."""

    def on_epoch_begin(self, epoch, logs=None):
        time.sleep(0.5)


def _fit(monitor, mnist_arrays, epochs=2):
    x, y = mnist_arrays[0][:200], mnist_arrays[1][:200]
    keras.utils.set_random_seed(0)
    trainer = trainers.make_trainer("standard", models.build_model("tiny_cnn", "mnist"))
    trainer.compile(optimizer="adam")
    t = time.time()
    history = trainer.fit(x, y, batch_size=50, epochs=epochs, verbose=0,
                          callbacks=[_Sleep(), monitor])
    return history.history, time.time() - t


def test_monitor_records_every_figure_and_counts_only_training_time(mnist_arrays):
    x, y = mnist_arrays[2][:100], mnist_arrays[3][:100]
    monitor = callbacks.RobustnessMonitor(x, y, 0.1, pgd_eps=0.1, pgd_steps=2, tup_eps=0.3,
                                          tup_images=(x[:50], y[:50]), tup_passes=1)
    history, wall = _fit(monitor, mnist_arrays)
    assert [r["epoch"] for r in monitor.records] == [1, 2]
    for r in monitor.records:
        assert set(r) == {"epoch", "train_seconds", "clean_accuracy", "fgsm_accuracy",
                          "pgd_accuracy", "tup_success"}
        assert 0 <= r["pgd_accuracy"] <= r["clean_accuracy"] <= 1 and 0 <= r["tup_success"] <= 1
    first, second = (r["train_seconds"] for r in monitor.records)
    assert first >= 0.5 and second >= first + 0.5  # other callbacks' time counts ...
    assert second < wall - 0.05  # ... the monitor's own does not
    assert history["fgsm_accuracy"] == [r["fgsm_accuracy"] for r in monitor.records]
    assert monitor.time_to_target is None


def test_monitor_stops_at_the_target_only_with_the_clean_target(mnist_arrays):
    x, y = mnist_arrays[2][:100], mnist_arrays[3][:100]
    reached = callbacks.RobustnessMonitor(x, y, 0.1, target=0.0)
    _fit(reached, mnist_arrays, epochs=3)
    assert len(reached.records) == 1 and reached.time_to_target == reached.train_seconds
    never = callbacks.RobustnessMonitor(x, y, 0.1, target=0.0, clean_target=1.0 + 1e-6)
    _fit(never, mnist_arrays, epochs=2)
    assert len(never.records) == 2 and never.time_to_target is None
    with pytest.raises(ValueError, match="tup_images"):
        callbacks.RobustnessMonitor(x, y, 0.1, tup_eps=0.3)
