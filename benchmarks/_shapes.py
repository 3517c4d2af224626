"""Shared by the benchmarks: one transformer block's parameter shapes, and a model of them."""


def transformer_block(d: int) -> list[tuple[int, ...]]:
    """qkv (weight, bias), out projection, two norms (2 x scale/bias as 3 vectors), MLP up/down."""
    return [(3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,)]


def transformer(d: int = 512, layers: int = 4, vocab: int = 32000, positions: int = 1024) -> list[tuple[int, ...]]:
    """Token and position embeddings, ``layers`` blocks, a final norm: 29.4M parameters by default."""
    out: list[tuple[int, ...]] = [(vocab, d), (positions, d)]
    for _ in range(layers):
        out += transformer_block(d)
    return out + [(d,), (d,)]
