"""Start the JAX and TensorFlow processes as soon as their tests are selected: they run in the
background while the PyTorch processes, which often wait on each other, run theirs."""


def pytest_collection_modifyitems(session, config, items):
    if config.option.collectonly:
        return
    modules = {item.module.__name__: item.module for item in items}
    for name in ("test_jax_multiprocess", "test_tf_multiworker"):
        if name in modules:
            modules[name].start()
