"""Small value classes without ``dataclasses``.

Importing ``dataclasses`` (which imports ``inspect``) and creating a dataclass cost every
start of the sidecar tens of milliseconds, before and while the agent starts. These bases
give the same behaviour to plain classes whose fields are their ``__slots__``: a repr and
equality by fields and, for ``Frozen``, read-only fields, a hash and a constructor that
takes the fields in order or by name.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing at run time
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any, TypeVar

    _F = TypeVar("_F", bound="Frozen")

_set = object.__setattr__


class Value:
    """Fields are ``__slots__`` (declared by the subclass, which is not subclassed again);
    names in ``_hidden`` are left out of the repr (secrets), and ``_field_repr`` shows the
    others."""

    __slots__ = ()
    _hidden: tuple[str, ...] = ()

    def _items(self) -> Iterator[tuple[str, Any]]:
        for name in self.__slots__:
            yield name, getattr(self, name)

    def _field_repr(self, name: str, value: Any) -> str:
        return repr(value)

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={self._field_repr(name, value)}" for name, value in self._items()
                          if name not in self._hidden)
        return f"{type(self).__name__}({shown})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__slots__)

    __hash__ = None  # type: ignore[assignment]  # mutable: compared by value, not hashable


class Frozen(Value):
    """Read-only after construction, hashable; ``_defaults`` holds the values of the fields
    a caller may leave out (immutable values only). A subclass lists its fields as
    annotations, then ``__slots__ = tuple(__annotations__)``: positional arguments follow
    that order."""

    __slots__ = ()
    _defaults: dict[str, Any] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = self.__slots__
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}() takes {len(names)} fields, {len(args)} given")
        for name, value in zip(names, args, strict=False):
            _set(self, name, value)
        for name in names[len(args):]:
            if name in kwargs:
                _set(self, name, kwargs.pop(name))
            elif name in self._defaults:
                _set(self, name, self._defaults[name])
            else:
                raise TypeError(f"{type(self).__name__}() missing field {name!r}")
        if kwargs:
            raise TypeError(f"{type(self).__name__}() has no field {next(iter(kwargs))!r}")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only: cannot delete {name!r}")

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, name) for name in self.__slots__))

    def replace(self: _F, **changes: Any) -> _F:
        """A copy with ``changes`` applied."""
        values = dict(self._items())
        unknown = changes.keys() - values.keys()
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {sorted(unknown)[0]!r}")
        values.update(changes)
        return type(self)(**values)
