"""How a group calls its workers: as Ray actors (object refs, streams, `ray.wait`), or as plain objects in
this process (the result is there when the call returns). Groups and the step's schedule use one of
these, so the same code drives both; the in-process groups are the reference the Ray step must equal."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import ray


class RayCalls:
    """Remote calls on Ray actors."""

    def submit(self, worker, method: str, *args, returns: int = 1, **kwargs):
        """An object ref (a tuple of them when `returns` > 1): Ray resolves refs passed as arguments."""
        fn = getattr(worker, method)
        return (fn.options(num_returns=returns) if returns != 1 else fn).remote(*args, **kwargs)

    def stream(self, worker, method: str, *args):
        """A streaming generator: its items as they are yielded."""
        return getattr(worker, method).options(num_returns="streaming").remote(*args)

    def next(self, stream):
        """The next item of a stream (StopIteration at its end); a lost worker raises here."""
        return ray.get(next(stream))

    def ready(self, handles, timeout: float | None = None) -> list:
        """A handle (or stream) with a result, waiting up to `timeout`; [] if none came."""
        done, _ = ray.wait(list(handles), num_returns=1, timeout=timeout)
        return done

    def get(self, handle, timeout: float | None = None):
        return ray.get(handle, timeout=timeout)

    def put(self, value):
        return ray.put(value)


@dataclass(eq=False)  # compared and hashed by identity, as Ray's object refs are told apart
class Done:
    """The result of an in-process call."""

    value: object


def _value(x):
    return x.value if isinstance(x, Done) else x


class LocalCalls:
    """Direct calls on objects in this process: each runs to its end when it is made."""

    def submit(self, worker, method: str, *args, returns: int = 1, **kwargs):
        out = getattr(worker, method)(*map(_value, args), **{k: _value(v) for k, v in kwargs.items()})
        return Done(out) if returns == 1 else tuple(Done(v) for v in out)

    def stream(self, worker, method: str, *args) -> Iterator:
        return iter(getattr(worker, method)(*map(_value, args)))

    def next(self, stream):
        return next(stream)

    def ready(self, handles, timeout: float | None = None) -> list:
        return list(handles)[:1]

    def get(self, handle, timeout: float | None = None):
        return [_value(h) for h in handle] if isinstance(handle, list) else _value(handle)

    def put(self, value):
        return Done(value)
