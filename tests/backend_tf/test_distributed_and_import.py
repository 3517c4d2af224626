"""MirroredStrategy over two logical CPUs equals one device; the missing-TensorFlow error. (Subprocesses.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap

MIRRORED = textwrap.dedent(
    """
    import os
    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np
    import keras
    import cautious.tensorflow as ctf
    from cautious import Caution

    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 6)).astype(np.float32)
    y = (x @ rng.standard_normal((6, 1)) + 0.1).astype(np.float32)

    def train(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8), keras.layers.Dense(1)])
            model.compile(optimizer=ctf.AdamW(learning_rate=0.02, caution=Caution("exact"),
                                              cautious_weight_decay=True), loss="mse")
        model.fit(x, y, batch_size=32, epochs=3, shuffle=False, verbose=0)
        return model.get_weights(), model

    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    assert len(devices) == 2, devices
    mirrored, model = train(tf.distribute.MirroredStrategy(devices))
    assert model.distribute_strategy.num_replicas_in_sync == 2
    single, _ = train(tf.distribute.OneDeviceStrategy(devices[0]))
    for a, b in zip(mirrored, single):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # per-replica copies of every variable are identical (the count saw the whole tensor)
    for v in model.trainable_variables:
        vals = [t.numpy() for t in v.value.values] if hasattr(v.value, "values") else [v.numpy()]
        assert len(vals) == 2, type(v.value)
        np.testing.assert_array_equal(vals[0], vals[1])
    print("OK")
    """
)


def test_mirrored_strategy_two_cpus_equals_one_device():
    out = subprocess.run([sys.executable, "-c", MIRRORED], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]


MISSING = textwrap.dedent(
    """
    import sys
    sys.modules["tensorflow"] = None
    try:
        import cautious.tensorflow
    except ImportError as exc:
        print(str(exc))
    else:
        print("imported")
    """
)


def test_missing_tensorflow_gives_install_hint():
    out = subprocess.run([sys.executable, "-c", MISSING], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == (
        "cautious.tensorflow needs TensorFlow and Keras 3: pip install 'cautious[tensorflow]'"
    ), out.stderr[-2000:]
