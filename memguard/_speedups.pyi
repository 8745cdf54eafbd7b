from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

class BodyCounter:
    _receive: Callable[[], Any]
    received: int
    _threshold: int
    _calls: int
    _fast: bool
    done: bool
    _timed: bool
    _waiting: bool
    def receiver(self) -> Receiver: ...

class Receiver:
    body: BodyCounter
    def __call__(self) -> Any: ...

def has_body_framing(headers: Iterable[Sequence[bytes]], /) -> bool: ...

class Guarded:
    def send(self, value: Any, /) -> Any: ...
    def throw(self, *args: Any) -> Any: ...
    def close(self) -> None: ...
    def __await__(self) -> Any: ...

def guard(app: Any, scope: Any, receive: Any, send: Any, after: Callable[..., Any], /,
          *after_args: Any) -> Awaitable[None]: ...

class Dispatch:
    app: Any
    _has_endpoints: bool
    def __call__(self, scope: Any, receive: Any, send: Any, /) -> Awaitable[None]: ...
