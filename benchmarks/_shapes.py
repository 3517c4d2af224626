"""Shared by the fused benchmarks: one transformer block's parameter shapes."""


def transformer_block(d: int) -> list[tuple[int, ...]]:
    """qkv (weight, bias), out projection, two norms (2 x scale/bias as 3 vectors), MLP up/down."""
    return [(3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,)]
