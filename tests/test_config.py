"""--key=value overrides of configuration dataclasses, and the check before a run resumes."""
import json
from dataclasses import dataclass, field

import pytest

from mixer_lite.config import apply_overrides, check_resumable


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


def test_resume_is_refused_with_other_settings_but_not_other_runtime_keys(tmp_path):
    saved = {"inner": {"width": 4}, "lr": 0.1, "amp": False}  # an older file: no size or limit
    (tmp_path / "config.json").write_text(json.dumps({"train": saved}))
    check_resumable(tmp_path, "train", Outer(), (), "--out")  # the missing keys are defaults
    check_resumable(tmp_path, "train", Outer(amp=True), ("amp",), "--out")
    with pytest.raises(ValueError, match=r"inner\.width: 4 in the run, 9 now.*new --out"):
        check_resumable(tmp_path, "train", Outer(inner=Inner(width=9)), ("amp",), "--out")
    with pytest.raises(ValueError, match="config.json: cannot read the run's config"):
        check_resumable(tmp_path, "pretrain", Outer(), (), "--run")
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match="config.json: cannot read"):
        check_resumable(tmp_path, "train", Outer(), (), "--out")
