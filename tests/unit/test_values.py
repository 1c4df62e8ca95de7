"""The value-class bases that stand in for dataclasses."""

from __future__ import annotations

import pytest

from agent_wrapper.values import Frozen, Value


class Point(Frozen):
    x: int
    y: int
    label: str
    secret: str | None
    __slots__ = tuple(__annotations__)
    _defaults = {"label": "", "secret": None}
    _hidden = ("secret",)


class Box(Value):
    __slots__ = ("items", "n")

    def __init__(self, items: list[int], n: int = 0) -> None:
        self.items = items
        self.n = n


def test_frozen_takes_fields_in_order_or_by_name_with_defaults() -> None:
    p = Point(1, y=2)
    assert (p.x, p.y, p.label, p.secret) == (1, 2, "", None)
    assert Point(1, 2, "a", "s").label == "a"


@pytest.mark.parametrize("args, kwargs, message", [
    ((1,), {}, "missing field 'y'"),
    ((1, 2, 3, 4, 5), {}, "takes 4 fields, 5 given"),
    ((1, 2), {"z": 3}, "has no field 'z'"),
])
def test_frozen_refuses_what_does_not_fit_its_fields(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        Point(*args, **kwargs)


def test_frozen_is_read_only_hashable_and_equal_by_fields() -> None:
    p = Point(1, 2)
    with pytest.raises(AttributeError):
        p.x = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del p.x
    assert p == Point(1, 2) and p != Point(1, 3)
    assert p != (1, 2, "", None)
    assert len({p, Point(1, 2), Point(2, 1)}) == 2


def test_replace_copies_with_changes_and_refuses_unknown_fields() -> None:
    p = Point(1, 2, "a")
    q = p.replace(y=5)
    assert (q.x, q.y, q.label) == (1, 5, "a") and p.y == 2
    with pytest.raises(TypeError, match="no field 'z'"):
        p.replace(z=1)


def test_repr_names_the_fields_and_leaves_out_the_hidden_ones() -> None:
    assert repr(Point(1, 2, "a", "hunter2")) == "Point(x=1, y=2, label='a')"


def test_a_mutable_value_compares_by_fields_and_is_not_hashable() -> None:
    b = Box([1])
    b.n = 2
    assert b == Box([1], 2) and b != Box([1], 3)
    assert repr(b) == "Box(items=[1], n=2)"
    with pytest.raises(TypeError):
        hash(b)
    with pytest.raises(AttributeError):
        b.other = 1  # type: ignore[attr-defined]


def test_settings_keep_their_secrets_out_of_the_repr() -> None:
    from sidecar import config

    s = config.build({"run_id": "r", "redis_url": "redis://h:1/0"}, {"REDIS_PASSWORD": "pw-123"}, ("true",))
    s = s.replace(control_secret=b"cs-456")
    assert s.redis_password == "pw-123"
    assert "pw-123" not in repr(s) and "cs-456" not in repr(s)
    in_url = config.build({"run_id": "r", "redis_url": "redis://u:pw-789@h:1/0"}, {}, ("true",))
    assert "pw-789" not in repr(in_url) and "redis_url='redis://u:***@h:1/0'" in repr(in_url)
