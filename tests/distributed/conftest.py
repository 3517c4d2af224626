"""Start launches as soon as their tests are selected, so that they overlap: the PyTorch
processes often wait on each other in collectives, which leaves CPU to the JAX and TensorFlow
ones. The 2-process and Triton PyTorch launches, JAX and TensorFlow start at collection; the
4-process launch starts when its first test asks for it (after the 2-process tests)."""

import scenarios as S


def pytest_collection_modifyitems(session, config, items):
    if config.option.collectonly:
        return
    modules = {item.module.__name__: item.module for item in items}
    selected = {item.originalname for item in items if item.module.__name__ == "test_torch_distributed"}
    if selected:
        torch_tests = modules["test_torch_distributed"]
        if selected - {"test_triton_kernels_same_design"}:
            torch_tests.start(min(S.WORLD_SIZES))
        if "test_triton_kernels_same_design" in selected:
            torch_tests.start(min(S.WORLD_SIZES), triton=True)
    for name in ("test_jax_multiprocess", "test_tf_multiworker"):
        if name in modules:
            modules[name].start()
