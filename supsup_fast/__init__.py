"""supsup_fast: Supermasks in Superposition with bit-packed masks and fused ops."""
from . import backends, ops
from .ops import pack_bits, unpack_bits
from .ops.registry import set_backend, use_backend

__version__ = "0.1.0"

__all__ = ["backends", "ops", "nn", "compat", "convert", "pack_bits", "unpack_bits", "set_backend", "use_backend", "__version__"]


def __getattr__(name):
    # Layers, models and algorithms import lazily: the op layer stays importable on its own.
    if name == "convert":  # supsup_fast.convert(model, ...): the function, not its module
        from .convert import convert
        globals()["convert"] = convert  # importing the submodule bound its module object here
        return convert
    if name in ("nn", "models", "algorithms", "data", "runs", "compat"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'supsup_fast' has no attribute {name!r}")
