from __future__ import annotations

from dataclasses import dataclass

import pytest

from banger import model, namegen
from banger.errors import BadRequest, NotFound


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "vm name is required"),
        ("a" * 64, f"vm name {'a' * 64!r} is 64 characters; max is 63 (DNS label limit)"),
        ("-abc", "vm name '-abc' cannot start or end with '-'"),
        ("abc-", "vm name 'abc-' cannot start or end with '-'"),
        ("Abc", "vm name 'Abc' has invalid character 'A' at position 0 (allowed: lowercase a-z, 0-9, '-')"),
        ("a_b", "vm name 'a_b' has invalid character '_' at position 1 (allowed: lowercase a-z, 0-9, '-')"),
        ("ab.c", "vm name 'ab.c' has invalid character '.' at position 2 (allowed: lowercase a-z, 0-9, '-')"),
        ("é", "vm name 'é' has invalid character 'é' at position 0 (allowed: lowercase a-z, 0-9, '-')"),
    ],
)
def test_bad_vm_names(name: str, message: str) -> None:
    with pytest.raises(BadRequest) as exc:
        model.validate_vm_name(name)
    assert exc.value.message == message


@pytest.mark.parametrize("name", ["a", "a" * 63, "brave-otter", "x1-2-3", "0"])
def test_good_vm_names(name: str) -> None:
    assert model.validate_vm_name(name) == name


def test_generated_names_are_valid_and_avoid_taken() -> None:
    taken: set[str] = set()
    for _ in range(300):
        name = namegen.generate(taken)
        model.validate_vm_name(name)
        assert name not in taken
        taken.add(name)


@dataclass(frozen=True)
class Item:
    id: str
    name: str


ITEMS = [Item("3f2a9c" + "0" * 26, "alpha"), Item("3f2b11" + "0" * 26, "beta"), Item("aa" * 16, "gamma")]


def test_resolve_ref_by_name_id_and_prefix() -> None:
    assert model.resolve_ref("beta", ITEMS).name == "beta"
    assert model.resolve_ref(ITEMS[2].id, ITEMS).name == "gamma"
    assert model.resolve_ref("3f2a", ITEMS).name == "alpha"
    assert model.resolve_ref("aa", ITEMS).name == "gamma"


def test_resolve_ref_ambiguous_and_missing() -> None:
    with pytest.raises(BadRequest, match="ambiguous: matches alpha, beta"):
        model.resolve_ref("3f2", ITEMS)
    with pytest.raises(NotFound, match="no vm named or with id 'zzz'"):
        model.resolve_ref("zzz", ITEMS)


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "a" * 129, "a b", "abc\n"])
def test_bad_artifact_names(name: str) -> None:
    with pytest.raises(BadRequest):
        model.validate_artifact_name("image", name)


def test_short_id_and_new_id() -> None:
    new = model.new_id()
    assert len(new) == 32 and int(new, 16) >= 0
    assert model.dedupe(["b", "a", "b"]) == ["b", "a"]
