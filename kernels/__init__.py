"""Triton kernels of thinkfuse, one module per op (installed as ``thinkfuse.kernels``).

Each module exposes host-side launchers that take already-validated tensors; argument checks
live in ``thinkfuse.ops``. Shapes are runtime arguments (never ``tl.constexpr`` unless they
are block sizes) so that new sequence lengths or row counts do not recompile.
"""
