"""Hostname-safe adjective-noun names for VMs created without --name."""

from __future__ import annotations

import secrets
from collections.abc import Container

ADJECTIVES = (
    "amber", "brave", "brisk", "calm", "clever", "crisp", "dapper", "eager", "fancy", "fuzzy",
    "gentle", "glad", "golden", "happy", "hazy", "jolly", "keen", "lively", "lucky", "mellow",
    "merry", "misty", "nimble", "noble", "plucky", "proud", "quick", "quiet", "rapid", "rosy",
    "rusty", "shiny", "silent", "sleek", "snappy", "sunny", "swift", "tidy", "vivid", "witty",
)
NOUNS = (
    "badger", "beacon", "bison", "cedar", "comet", "coral", "crane", "falcon", "fern", "finch",
    "fjord", "gecko", "harbor", "heron", "island", "jaguar", "kestrel", "lagoon", "lemur", "lynx",
    "maple", "meadow", "otter", "panda", "pebble", "pine", "puffin", "quartz", "raven", "reef",
    "river", "robin", "saffron", "sparrow", "spruce", "summit", "tiger", "tundra", "walrus", "willow",
)


def generate(taken: Container[str] = ()) -> str:
    """A free adjective-noun name; a numeric suffix is added once the plain pairs run short."""
    for attempt in range(64):
        name = f"{secrets.choice(ADJECTIVES)}-{secrets.choice(NOUNS)}"
        if attempt >= 16:
            name = f"{name}-{secrets.randbelow(10_000)}"
        if name not in taken:
            return name
    return f"vm-{secrets.token_hex(4)}"
