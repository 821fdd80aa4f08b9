"""Tags of a key (`domain_core.keytags`): AWS KMS's rules and what a change changes."""

from __future__ import annotations

import pytest

from domain_core import keytags
from domain_core.errors import InvalidInputError, LimitExceededError
from domain_proto import keys_pb2

pytestmark = pytest.mark.unit


def test_tag_adds_replaces_and_says_when_nothing_changes() -> None:
    metadata = keys_pb2.KeyMetadata(key_id="k", tags={"team": "a"})
    assert keytags.tag(metadata, {"team": "b", "env": ""})
    assert dict(metadata.tags) == {"team": "b", "env": ""}
    assert not keytags.tag(metadata, {"team": "b"})
    assert keytags.untag(metadata, ["env", "absent"])
    assert not keytags.untag(metadata, ["absent"])
    assert dict(metadata.tags) == {"team": "b"}


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ({"": "v"}, "1 to 128"),
        ({"k" * 129: "v"}, "1 to 128"),
        ({"a\nb": "v"}, "printable"),
        ({"AWS:x": "v"}, "reserved"),
        ({"k": "v" * 257}, "at most 256"),
        ({"k": "\x00"}, "printable"),
    ],
)
def test_malformed_tags_are_refused(tags: dict[str, str], message: str) -> None:
    metadata = keys_pb2.KeyMetadata(key_id="k")
    with pytest.raises(InvalidInputError, match=message):
        keytags.tag(metadata, tags)
    assert not metadata.tags


def test_at_most_50_tags_and_something_to_do() -> None:
    metadata = keys_pb2.KeyMetadata(key_id="k", tags={f"t{n}": "" for n in range(50)})
    assert not keytags.tag(metadata, {"t0": ""})  # replacing keeps 50
    with pytest.raises(LimitExceededError, match="at most 50"):
        keytags.tag(metadata, {"t50": ""})
    with pytest.raises(InvalidInputError, match="at least one tag"):
        keytags.tag(metadata, {})
    with pytest.raises(InvalidInputError, match="at least one tag key"):
        keytags.untag(metadata, [])
