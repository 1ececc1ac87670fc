"""--key=value overrides of configuration dataclasses."""
from dataclasses import dataclass, field

import pytest

from mixer_lite.config import apply_overrides


@dataclass(frozen=True)
class Inner:
    width: int = 4
    name: str = "a"


@dataclass(frozen=True)
class Outer:
    lr: float = 0.1
    amp: bool = False
    size: tuple[int, int] = (1, 2)
    limit: int | None = None
    inner: Inner = field(default_factory=Inner)


def test_overrides_parse_by_type():
    c = apply_overrides(Outer(), ["--lr=0.5", "amp=true", "--size=3,4", "--inner.width=9",
                                  "--limit=7"])
    assert c == Outer(lr=0.5, amp=True, size=(3, 4), limit=7, inner=Inner(width=9))
    assert apply_overrides(c, ["--limit=none"]).limit is None


@pytest.mark.parametrize("item,msg", [
    ("--lrr=1", "unknown config key 'lrr'"),
    ("--lr=fast", "expected float"),
    ("--amp=maybe", "expected true or false"),
    ("--inner=3", "is a group"),
    ("--inner.depth=3", "unknown config key 'inner.depth'"),
    ("--lr", "expected --key=value"),
])
def test_bad_overrides_are_rejected_with_the_key(item, msg):
    with pytest.raises(ValueError, match=msg):
        apply_overrides(Outer(), [item])
