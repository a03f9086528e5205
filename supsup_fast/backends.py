"""``ss.backends.available()`` and friends: which implementation of the op contract runs."""
from .ops.registry import available, backend_for, get_backend_name, register_backend, set_backend, use_backend

__all__ = ["available", "backend_for", "get_backend_name", "register_backend", "set_backend", "use_backend"]
