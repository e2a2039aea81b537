"""The content-addressed store: names that cannot escape the root, manifests
that are never followed outside it, shared blobs, bare-name resolution and
imports that leave nothing behind when the file is bad."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from edgeinfer import paths
from edgeinfer.errors import GGUFError, InvalidNameError, ModelNotFoundError, StoreError
from edgeinfer.names import ModelRef, parse_ref
from edgeinfer.pull import import_file
from edgeinfer.store import Manifest, ModelStore

BAD_NAMES = ["../x", "/abs", "a/b", "..", "x:y:z", "", ".hidden", "x:../y", ":tag", "a\\b", "x\0y"]


@pytest.fixture
def store() -> ModelStore:
    return ModelStore()


@pytest.fixture(scope="module")
def tiny_sha(tiny_model) -> str:
    return hashlib.sha256(tiny_model.read_bytes()).hexdigest()


def everything_under(root: Path) -> list[Path]:
    """Every file in the store except lock files (empty, harmless)."""
    if not root.exists():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and p.parent.name != "locks")


def write_catalog_entry(name: str, tag: str, sha: str, size: int) -> None:
    folder = paths.config_dir() / "models"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.toml").write_text(
        f'name = "{name}"\ntag = "{tag}"\ndefault_tag = true\nfile = "x.gguf"\n'
        f'size = {size}\nsha256 = "{sha}"\n\n[[sources]]\nkind = "https"\n'
        f'url = "http://127.0.0.1:9/x.gguf"\n', encoding="utf-8")


# -- names --------------------------------------------------------------------

@pytest.mark.parametrize("bad", BAD_NAMES)
def test_bad_names_are_refused_everywhere(bad, store, tiny_model):
    with pytest.raises(InvalidNameError):
        parse_ref(bad)
    with pytest.raises(InvalidNameError):
        store.get(bad)
    with pytest.raises(InvalidNameError):
        import_file(tiny_model, bad, store=store)
    assert everything_under(store.root) == []


def test_names_are_lower_cased(store, tiny_model):
    assert parse_ref("SmolLM2-135M:Q4_1") == ModelRef("smollm2-135m", "q4_1")

    m = import_file(tiny_model, "Tiny-Model:Mine", store=store)

    assert m.ref == "tiny-model:mine"
    assert (store.manifests / "tiny-model" / "mine.json").is_file()
    assert store.get("TINY-MODEL:MINE").sha256 == m.sha256


@pytest.mark.parametrize("bad", ["sha256-x", "../../etc/passwd", "g" * 64, "0" * 63])
def test_blob_paths_need_a_hex_digest(store, bad):
    with pytest.raises(StoreError):
        store.blob_path(bad)


@pytest.mark.parametrize("bad", ["../evil-key", "short", "UPPER-case-key", "a/b/c/d/e/f"])
def test_partial_keys_are_checked(store, bad):
    with pytest.raises(StoreError):
        store.partial_path(bad)


# -- manifests ------------------------------------------------------------------

def _hand_written(store: ModelStore, name: str, tag: str, data: dict) -> Path:
    path = store.manifests / name / f"{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("field,value", [
    ("sha256", "../../etc/passwd"),
    ("sha256", "/etc/passwd"),
    ("name", "../../outside"),
    ("tag", "../up"),
])
def test_manifest_pointing_outside_the_root_is_ignored(store, tiny_model, field, value):
    good = import_file(tiny_model, "good:one", store=store)
    data = {"name": "evil", "tag": "latest", "sha256": good.sha256, "size": 1}
    data[field] = value
    _hand_written(store, "evil", "latest", data)

    assert store.get("evil:latest") is None
    assert [m.ref for m in store.list()] == ["good:one"]
    with pytest.raises(ModelNotFoundError):
        store.resolve("evil:latest")
    assert all(m.path.is_relative_to(store.blobs) for m in store.list())


@pytest.mark.parametrize("text", ["", "{", "[]", '{"name": "x"}', "\xff\xfe"])
def test_damaged_manifest_is_treated_as_absent(store, text):
    path = store.manifests / "broken" / "latest.json"
    path.parent.mkdir(parents=True)
    path.write_text(text, encoding="utf-8", errors="surrogateescape")

    assert store.get("broken:latest") is None
    assert store.list() == []


def test_manifest_whose_name_disagrees_with_its_path(store, tiny_model):
    import_file(tiny_model, "foo:latest", store=store)
    shutil.copytree(store.manifests / "foo", store.manifests / "baz")

    # The copy does not answer for "baz": there is nothing to remove.
    with pytest.raises(ModelNotFoundError):
        store.remove("baz:latest")

    assert (store.manifests / "foo" / "latest.json").is_file(), "rm baz deleted foo"
    assert store.get("baz:latest") is None


def test_put_requires_the_blob(store):
    with pytest.raises(StoreError):
        store.put(Manifest("ghost", "latest", "0" * 64, 10))
    assert store.list() == []


# -- rm and shared blobs -------------------------------------------------------

def test_rm_deletes_the_blob_only_with_its_last_name(store, tiny_model, tiny_sha):
    a = import_file(tiny_model, "first:one", store=store)
    b = import_file(tiny_model, "second:two", store=store)
    blob = store.blob_path(tiny_sha)
    assert a.sha256 == b.sha256 == tiny_sha
    assert sorted(store.blobs.iterdir()) == [blob]

    m, gone = store.remove("first:one")
    assert (m.ref, gone) == ("first:one", False)
    assert blob.is_file() and store.get("first:one") is None
    assert not (store.manifests / "first").exists()

    m, gone = store.remove("second")  # a bare name with one tag
    assert (m.ref, gone) == ("second:two", True)
    assert not blob.exists()
    assert store.list() == []

    with pytest.raises(ModelNotFoundError):
        store.remove("second:two")


# -- bare names ----------------------------------------------------------------

def test_bare_name_resolution(store, tiny_model, tiny_sha):
    assert store.get("tiny") is None

    import_file(tiny_model, "tiny:other", store=store)
    assert store.get("tiny").tag == "other"  # the only tag

    import_file(tiny_model, "tiny:third", store=store)
    with pytest.raises(InvalidNameError) as exc:
        store.get("tiny")
    assert "other" in str(exc.value) and "third" in str(exc.value)
    assert "tiny:" in exc.value.hint

    write_catalog_entry("tiny", "cat", tiny_sha, tiny_model.stat().st_size)
    import_file(tiny_model, "tiny:cat", store=store)
    assert store.get("tiny").tag == "cat"  # the catalog's default tag wins
    assert store.resolve("tiny").ref == "tiny:cat"


# -- import --------------------------------------------------------------------

def test_import_copies_and_records_provenance(store, tiny_model, tiny_sha):
    m = import_file(tiny_model, "tiny", store=store)

    assert m.ref == "tiny:f16"  # the tag comes from the file type when none is given
    assert m.sha256 == tiny_sha and m.size == tiny_model.stat().st_size
    assert hashlib.sha256(store.blob_path(tiny_sha).read_bytes()).hexdigest() == tiny_sha
    assert m.file == tiny_model.name and str(tiny_model.resolve()) in m.source
    assert m.facts["architecture"] == "llama" and m.facts["context_length"] == 8192
    assert not list(store.blobs.glob("*.partial"))


@pytest.mark.parametrize("keep", [0, 3, 100, 0.5, -1])
def test_import_of_a_truncated_gguf_leaves_nothing(store, tiny_model, tmp_path, keep):
    data = tiny_model.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:n])

    with pytest.raises(GGUFError):
        import_file(bad, "cut:test", store=store)

    assert everything_under(store.root) == []
    assert store.list() == []


def test_import_of_a_missing_file(store, tmp_path):
    with pytest.raises(ModelNotFoundError):
        import_file(tmp_path / "nope.gguf", "x", store=store)
    assert everything_under(store.root) == []
