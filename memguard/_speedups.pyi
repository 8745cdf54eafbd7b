from collections.abc import Callable, Iterable, Sequence
from typing import Any

class BodyCounter:
    _receive: Callable[[], Any]
    received: int
    _threshold: int
    _calls: int
    _fast: bool
    _timed: bool
    _waiting: bool
    def __call__(self) -> Any: ...

def has_body_framing(headers: Iterable[Sequence[bytes]], /) -> bool: ...
