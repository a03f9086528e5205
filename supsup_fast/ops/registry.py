"""Backend registry: which implementation of the op contract runs.

A backend is an object with the methods of :class:`supsup_fast.ops.backends.reference.ReferenceBackend`
(kernel backends subclass it and override what they accelerate). ``use_backend`` scopes a choice
to a ``with`` block (a context variable, so threads and async tasks do not leak into each other);
``set_backend`` changes the process default. ``"auto"`` picks the fastest backend that supports
the tensors' device.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Dict, Iterator, List, Optional

import torch

AUTO = "auto"

# name -> (factory, priority); higher priority wins under "auto". Factories run lazily so that
# importing the package never builds or loads a kernel.
_FACTORIES: Dict[str, tuple] = {}
_INSTANCES: Dict[str, object] = {}
_FAILURES: Dict[str, Exception] = {}  # backends whose factory failed: not retried on every op call
_available: Optional[List[str]] = None
_default_name = AUTO
_scoped_name: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("supsup_backend", default=None)
_RESOLVED: Dict[tuple, object] = {}  # (name in force, device) -> backend: every op call asks, a batch-1 layer feels it
_resolved_for: tuple = ()  # the registry state _RESOLVED was filled in


def register_backend(name: str, factory: Callable[[], object], priority: int) -> None:
    """Register a backend. ``factory()`` returns the backend or raises ``RuntimeError`` if it
    cannot run on this machine (missing extension, no GPU...)."""
    global _available
    _FACTORIES[name] = (factory, priority)
    _INSTANCES.pop(name, None)
    _FAILURES.pop(name, None)
    _RESOLVED.clear()
    _available = None


def _instance(name: str):
    if name in _FAILURES:
        raise RuntimeError(str(_FAILURES[name]))
    if name not in _INSTANCES:
        factory, _ = _FACTORIES[name]
        try:
            _INSTANCES[name] = factory()
        except (RuntimeError, ImportError) as exc:
            _FAILURES[name] = exc
            raise
    return _INSTANCES[name]


def available() -> List[str]:
    """Names of the backends that load on this machine, fastest first ("reference" always)."""
    global _available
    if _available is None:
        _RESOLVED.clear()
        names = []
        for name, (_, prio) in sorted(_FACTORIES.items(), key=lambda kv: -kv[1][1]):
            try:
                _instance(name)
            except (RuntimeError, ImportError):
                continue
            names.append(name)
        _available = names
    return list(_available)


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a str, got {type(name).__name__}")
    if name != AUTO and name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; expected one of {[AUTO] + sorted(_FACTORIES)}")
    if name != AUTO:
        try:
            _instance(name)
        except (RuntimeError, ImportError) as exc:
            raise RuntimeError(f"backend {name!r} is not available on this machine: {exc}") from exc
    return name


def set_backend(name: str) -> None:
    """Set the process-wide default backend ("auto" restores automatic choice)."""
    global _default_name
    _default_name = _check_name(name)


def get_backend_name() -> str:
    """The backend name in force here ("auto" unless set)."""
    scoped = _scoped_name.get()
    return scoped if scoped is not None else _default_name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force one backend inside a ``with`` block."""
    token = _scoped_name.set(_check_name(name))
    try:
        yield
    finally:
        _scoped_name.reset(token)


def backend_for(device: torch.device):
    """The backend that runs an op whose tensors live on ``device``."""
    global _resolved_for
    name = _scoped_name.get()
    if name is None:
        name = _default_name
    # Identity tests, not a tuple of id()s: every op call runs this, often with the interpreter's
    # caches cold after a large kernel (a batch-1 layer), where each lookup costs.
    seen = _resolved_for
    if not (seen and seen[0] is _FACTORIES and seen[1] is _INSTANCES and seen[2] is _FAILURES and seen[3] is _available):
        _RESOLVED.clear()  # the registry was rebuilt or swapped (tests do): resolve again
        _resolved_for = (_FACTORIES, _INSTANCES, _FAILURES, _available)
    found = _RESOLVED.get((name, device))
    if found is None:
        found = _RESOLVED[(name, device)] = _resolve(name, device)
    return found


def _resolve(name: str, device: torch.device):
    if name != AUTO:
        backend = _instance(name)
        if not backend.supports(device):
            raise RuntimeError(f"backend {name!r} cannot run on device {device}")
        return backend
    for cand in _available if _available is not None else available():
        backend = _INSTANCES[cand]
        if backend.supports(device):
            return backend
    raise RuntimeError(f"no backend supports device {device}")
