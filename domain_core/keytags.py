"""Tags of a customer key (AWS KMS's resource tags): pure rules over `KeyMetadata.tags`, applied
by the key service as key changes (`keylifecycle.KeyChange`).

Invariants: a key holds at most `MAX_TAGS_PER_KEY` tags; a tag key is 1 to
`MAX_TAG_KEY_CHARS` printable characters and does not start with "aws:" (reserved, as in AWS
KMS); a value is 0 to `MAX_TAG_VALUE_CHARS` printable characters; tagging with a key it has
replaces the value; a change that changes nothing says so (no new metadata version). Tags are
metadata, never secret, and decide nothing about access.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from domain_core.errors import InvalidInputError, LimitExceededError
from domain_core.limits import MAX_TAG_KEY_CHARS, MAX_TAG_VALUE_CHARS, MAX_TAGS_PER_KEY
from domain_proto import keys_pb2

__all__ = ["check_tags", "tag", "untag"]

_SHOWN = 60


def check_tags(tags: Mapping[str, str]) -> None:
    """InvalidInputError unless every tag key and value is well formed."""
    for key, value in tags.items():
        if not 1 <= len(key) <= MAX_TAG_KEY_CHARS or not key.isprintable():
            raise InvalidInputError(
                f"tag key {key[:_SHOWN]!r}: 1 to {MAX_TAG_KEY_CHARS} printable characters"
            )
        if key.lower().startswith("aws:"):
            raise InvalidInputError(f"tag key {key[:_SHOWN]!r}: the aws: prefix is reserved")
        if len(value) > MAX_TAG_VALUE_CHARS or not value.isprintable():
            raise InvalidInputError(
                f"the value of tag {key[:_SHOWN]!r}: at most {MAX_TAG_VALUE_CHARS} printable "
                "characters"
            )


def tag(metadata: keys_pb2.KeyMetadata, tags: Mapping[str, str]) -> bool:
    """TagResource: add `tags` (replacing values of keys the key has); False if nothing
    changes."""
    if not tags:
        raise InvalidInputError("give at least one tag")
    check_tags(tags)
    merged = dict(metadata.tags) | dict(tags)
    if len(merged) > MAX_TAGS_PER_KEY:
        raise LimitExceededError(
            f"key {metadata.key_id} would hold {len(merged)} tags; a key holds at most "
            f"{MAX_TAGS_PER_KEY}: untag some first"
        )
    if merged == dict(metadata.tags):
        return False
    metadata.tags.clear()
    metadata.tags.update(merged)
    return True


def untag(metadata: keys_pb2.KeyMetadata, tag_keys: Iterable[str]) -> bool:
    """UntagResource: remove the tags of `tag_keys` (keys it does not have are ignored, as in
    AWS KMS); False if nothing changes."""
    keys = list(tag_keys)
    if not keys:
        raise InvalidInputError("give at least one tag key")
    if len(keys) > MAX_TAGS_PER_KEY:
        raise LimitExceededError(f"at most {MAX_TAGS_PER_KEY} tag keys at once")
    present = [key for key in keys if key in metadata.tags]
    for key in present:
        del metadata.tags[key]
    return bool(present)
