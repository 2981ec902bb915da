"""Data files: our safetensors format, readers, validation of bad inputs, the cache."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from bundleflow.errors import BundleflowError
from bundleflow.valuations import cats, cats_generate
from bundleflow.valuations.cats_data import (
    cache_key,
    cached_dataset,
    generate_dataset,
    generator_settings,
)
from bundleflow.valuations.cats_text import read_cats_text
from bundleflow.valuations.dataset import convert, load_dataset
from bundleflow.valuations.split import DEFAULT_SPLIT, reference_split, split_from_fractions
from bundleflow.valuations.tensor_files import (
    FORMAT_NAME,
    FORMAT_VERSION,
    save_dataset,
    tensor_sha256,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
# Written by bundleflow's own safetensors writer (format version 1, before the library wrote
# them): `bundleflow data generate --dist regions --items 5 --n 40 --seed 7`.
V1_FILE = Path(__file__).resolve().parent / "data" / "regions-m5-n40-v1.safetensors"
V1_FILE_SHA256 = "68ac7a8e71e046bee7469b56eb7180abbc1900c7de2a71944d539b193c93b5b4"
V1_TENSOR_SHA256 = "3d2cb54542287fcc85e82d1b6bbf112f5d44083cbaef4b8fe8dd6c47e898d300"
CATS_FIXTURES = SHARED / "fixtures" / "cats"


def _valuations(n=20, k=3, m=5, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    items = (torch.rand(n, k, m, generator=g) < 0.5).float()
    items[:, 0, 0] = 1.0  # every valuation has at least one atom
    values = torch.rand(n, k, generator=g) * 100 * (items.sum(-1) > 0)
    return torch.cat([items, values.unsqueeze(-1)], dim=-1)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _NeedsCode:
    """Pickled as a class instance: loading it needs this code."""


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# --- our format -----------------------------------------------------------------------


def test_generated_set_round_trips_with_metadata(tmp_path):
    out = generate_dataset(tmp_path / "a.safetensors", "arbitrary", 8, 40, seed=1)
    data = load_dataset(out, n_items=8)
    meta = data.metadata
    assert data.valuations.shape == (40, 6, 9)
    assert meta["format"] == FORMAT_NAME and meta["format_version"] == 2
    gen = meta["generator"]
    assert (gen["dist"], gen["n_items"], gen["n"], gen["seed"]) == ("arbitrary", 8, 40, 1)
    assert gen["params"]["budget_factor"] == 1.5 and gen["values"] == "upv"
    assert meta["sha256"] == tensor_sha256(data.valuations)
    assert data.split.origin == "recorded"
    assert data.split.sizes() == {"train": 36, "val": 2, "test": 2}
    assert data.part("test").shape[0] == 2
    assert (
        "bundleflow data generate --dist arbitrary --items 8 --n 40 --seed 1" in meta["regenerate"]
    )


def test_same_settings_same_bytes_different_seed_different(tmp_path):
    a = generate_dataset(tmp_path / "a.safetensors", "regions", 9, 30, seed=4)
    b = generate_dataset(tmp_path / "b.safetensors", "regions", 9, 30, seed=4)
    c = generate_dataset(tmp_path / "c.safetensors", "regions", 9, 30, seed=5)
    assert a.read_bytes() == b.read_bytes()
    assert _sha(a) != _sha(c)


def test_our_files_are_plain_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    pytest.importorskip("numpy")  # safetensors.torch writes through numpy (matplotlib has it)
    v = _valuations()
    path = save_dataset(tmp_path / "v.safetensors", v, {"note": "x"})
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert torch.equal(f.get_tensor("valuations"), v)
        assert json.loads(f.metadata()["bundleflow"])["note"] == "x"


def test_reads_files_written_by_the_safetensors_library(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    pytest.importorskip("numpy")
    v = _valuations()
    st.save_file({"x": v.double()}, str(tmp_path / "other.safetensors"))
    data = load_dataset(tmp_path / "other.safetensors")
    assert torch.equal(data.valuations, v) and data.split.origin == "reference"


def _header(raw: bytes) -> tuple[dict, bytes]:
    """A safetensors file's JSON header and its data section."""
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def test_version_1_files_still_read_as_before():
    """A file of the former hand-written writer: the same tensor, metadata and split that
    writer's reader returned (pinned here from it)."""
    assert _sha(V1_FILE) == V1_FILE_SHA256, "the fixture itself changed"
    data = load_dataset(V1_FILE, n_items=5)
    assert data.valuations.dtype == torch.float32 and data.valuations.shape == (40, 6, 6)
    assert tensor_sha256(data.valuations) == V1_TENSOR_SHA256
    meta = data.metadata
    assert (meta["format"], meta["format_version"], meta["sha256"]) == (
        FORMAT_NAME,
        1,
        V1_TENSOR_SHA256,
    )
    assert meta["shape"] == [40, 6, 6] and meta["generator"]["seed"] == 7
    assert (data.split.origin, data.split.train, data.split.val, data.split.test) == (
        "recorded",
        (0, 36),
        (36, 38),
        (38, 40),
    )


def test_version_2_differs_from_version_1_only_in_the_header_key_order(tmp_path):
    """Rewriting a version-1 file's tensor and metadata: the same data bytes and header
    length; the header's JSON differs only in format_version (the library orders a tensor's
    keys dtype, shape, data_offsets; version 1 sorted them)."""
    old = load_dataset(V1_FILE)
    meta = {k: v for k, v in old.metadata.items() if k not in ("sha256", "shape", "dtype")}
    path = save_dataset(tmp_path / "v2.safetensors", old.valuations, meta)
    (h1, data1), (h2, data2) = _header(V1_FILE.read_bytes()), _header(path.read_bytes())
    assert data2 == data1 and len(path.read_bytes()) == len(V1_FILE.read_bytes())
    m1, m2 = (json.loads(h.pop("__metadata__")["bundleflow"]) for h in (h1, h2))
    assert h1 == h2
    assert (m1.pop("format_version"), m2.pop("format_version")) == (1, FORMAT_VERSION)
    assert m1 == m2
    again = load_dataset(path)
    assert torch.equal(again.valuations, old.valuations)
    assert again.split.to_dict() == old.split.to_dict()


def test_cache_names_survive_the_format_version(tmp_path):
    """Sets cached before version 2 keep their file names (the cache key did not move)."""
    settings = generator_settings("regions", 5, 40, 7)
    blob = {"settings": settings, "split": list(DEFAULT_SPLIT), "format_version": 1}
    want = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()
    assert cache_key(settings, DEFAULT_SPLIT) == want


def test_loaded_data_do_not_depend_on_the_file_afterwards(tmp_path):
    """The library maps files into memory; the loaded set must be a copy, else a file
    truncated or copied over in place while a run trains kills it with SIGBUS."""
    script = (
        "import sys, torch\n"
        "from bundleflow.valuations.dataset import load_dataset\n"
        "data = load_dataset(sys.argv[1])\n"
        "open(sys.argv[1], 'wb').close()\n"
        "print(float(data.valuations.sum()))\n"
    )
    path = save_dataset(tmp_path / "v.safetensors", _valuations(n=2000), {})
    want = float(load_dataset(path).valuations.sum())
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert float(done.stdout) == want


def test_write_is_atomic(tmp_path, monkeypatch):
    path = save_dataset(tmp_path / "v.safetensors", _valuations(seed=1), {})
    before = path.read_bytes()

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(BundleflowError, match="disk full"):
        save_dataset(path, _valuations(seed=2), {})
    assert path.read_bytes() == before, "the old file is untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.safetensors"], "no temp file left"


# --- the reference layout -------------------------------------------------------------


def test_pt_file_uses_the_reference_split(tmp_path):
    v = _valuations(n=200)
    torch.save(v, tmp_path / "ref.pt")
    data = load_dataset(tmp_path / "ref.pt", n_items=5)
    assert torch.equal(data.valuations, v)
    # first 95% training (its last 5% validation), last 5% test
    assert data.split.origin == "reference"
    assert (data.split.train, data.split.val, data.split.test) == ((0, 181), (181, 190), (190, 200))


def test_reference_split_sizes():
    s = reference_split(20_000)
    assert s.sizes() == {"train": 18_050, "val": 950, "test": 1_000}
    s = split_from_fractions(20_000, (0.90, 0.05, 0.05))
    assert s.sizes() == {"train": 18_000, "val": 1_000, "test": 1_000}
    with pytest.raises(BundleflowError, match="--split"):
        split_from_fractions(100, (0.9, 0.2, 0.05))


def test_pt_dict_and_zip(tmp_path):
    v = _valuations()
    torch.save({"valuations": v, "note": "x"}, tmp_path / "d.pt")
    assert torch.equal(load_dataset(tmp_path / "d.pt").valuations, v)
    torch.save(v, tmp_path / "inner.pt")
    with zipfile.ZipFile(tmp_path / "pub.zip", "w") as z:
        z.write(tmp_path / "inner.pt", "data/cats_m5.pt")
    assert torch.equal(load_dataset(tmp_path / "pub.zip").valuations, v)
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as z:
        z.write(tmp_path / "inner.pt", "a.pt")
        z.write(tmp_path / "inner.pt", "b.pt")
    with pytest.raises(BundleflowError, match=r"two\.zip.*exactly one"):
        load_dataset(tmp_path / "two.zip")


def test_pickle_needing_code_is_refused(tmp_path):
    torch.save({"valuations": _valuations(), "obj": _NeedsCode()}, tmp_path / "code.pt")
    with pytest.raises(BundleflowError, match=r"code\.pt.*pickled Python code"):
        load_dataset(tmp_path / "code.pt")


def test_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(_RunsCode(str(marker)), protocol=2))
    with pytest.raises(BundleflowError, match=r"evil\.pt"):
        load_dataset(tmp_path / "evil.pt")
    assert not marker.exists()


# --- validation: each bad input names the file ------------------------------------------


def _set(v, index, value):
    v[index] = value
    return v


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("rank", lambda: _valuations()[0], "rank 3"),
        ("empty", lambda: torch.zeros(0, 3, 6), "empty"),
        ("nan", lambda: _set(_valuations(), (2, 0, -1), float("nan")), "non-finite"),
        ("inf", lambda: _set(_valuations(), (2, 1, -1), float("inf")), "non-finite"),
        ("nonbinary", lambda: _set(_valuations(), (1, 0, 2), 0.5), "must be 0 or 1"),
        ("negative", lambda: _set(_valuations(), (3, 0, -1), -1.0), "negative value"),
        ("no atoms", lambda: _set(_valuations(), 4, 0.0), "valuation 4 has no atoms"),
        (
            "value on empty",
            lambda: _set(_valuations(), (4, 2), torch.tensor([0.0] * 5 + [3.0])),
            "empty bundle",
        ),
    ],  # fmt: skip
)
def test_bad_tensors_are_rejected_naming_the_file(tmp_path, name, make, message):
    path = tmp_path / f"bad-{name.replace(' ', '-')}.pt"
    torch.save(make(), path)
    with pytest.raises(BundleflowError, match=message) as err:
        load_dataset(path)
    assert str(path) in str(err.value)


def test_m_mismatch(tmp_path):
    torch.save(_valuations(m=5), tmp_path / "m5.pt")
    with pytest.raises(BundleflowError, match=r"m5\.pt.*m=5 items but this run uses m=10"):
        load_dataset(tmp_path / "m5.pt", n_items=10)


def test_empty_and_missing_files(tmp_path):
    for name in ("e.safetensors", "e.pt", "e.txt", "e.zip"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(BundleflowError, match=rf"{name}: the file is empty"):
            load_dataset(tmp_path / name)
    with pytest.raises(BundleflowError, match="no such file"):
        load_dataset(tmp_path / "missing.safetensors")


def test_truncated_files(tmp_path):
    path = save_dataset(tmp_path / "v.safetensors", _valuations(), {})
    raw = path.read_bytes()
    for cut in (4, 40, len(raw) - 10):
        (tmp_path / "cut.safetensors").write_bytes(raw[:cut])
        with pytest.raises(BundleflowError, match=r"cut\.safetensors.*(truncated|shorter)"):
            load_dataset(tmp_path / "cut.safetensors")
    torch.save(_valuations(), tmp_path / "v.pt")
    raw = (tmp_path / "v.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BundleflowError, match=r"cut\.pt.*truncated or corrupt"):
        load_dataset(tmp_path / "cut.pt")


def test_checksum_mismatch(tmp_path):
    path = save_dataset(tmp_path / "v.safetensors", _valuations(), {})
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # flip a bit of the last value
    path.write_bytes(bytes(raw))
    with pytest.raises(BundleflowError, match="checksum mismatch"):
        load_dataset(path)


def test_output_suffix_checked(tmp_path):
    with pytest.raises(BundleflowError, match=r"\.safetensors"):
        save_dataset(tmp_path / "v.npy", _valuations(), {})
    with pytest.raises(BundleflowError, match=r"\.safetensors"):
        generate_dataset(tmp_path / "v.pt", "arbitrary", 5, 5, seed=0)


# --- CATS text ----------------------------------------------------------------------------

CATS_TEXT = """%% a comment
goods 4
bids 4
dummy 2

0\t10.5\t0\t1\t4\t#
1\t9\t2\t3\t4\t#
2\t3.25\t1\t#
3\t7\t0\t2\t5\t#
"""


def test_cats_text_groups_bidders_and_drops_dummies(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text(CATS_TEXT)
    parsed = read_cats_text(path)
    assert (parsed.goods, parsed.bids, parsed.dummy, parsed.bid_lines) == (4, 4, 2, 4)
    assert parsed.bidders == [[(10.5, (0, 1)), (9.0, (2, 3))], [(3.25, (1,))], [(7.0, (0, 2))]]
    v = load_dataset(path, n_items=4).valuations
    assert v.shape == (3, 2, 5)
    assert v[0].tolist() == [[1, 1, 0, 0, 10.5], [0, 0, 1, 1, 9.0]]
    assert v[1, 1].tolist() == [0] * 5


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("bids 4", "bids 6"), r"small\.txt:\d+: the header announces 6"),
        (
            lambda t: t.replace("3\t7\t0\t2\t5\t#", "3\t7\t0\t2"),
            r"small\.txt:9: .*must end with '#'",
        ),
        (lambda t: t.replace("9\t2\t3", "x\t2\t3"), r"small\.txt:7: non-numeric"),
        (lambda t: t.replace("3.25\t1", "3.25\t9"), r"small\.txt:8: good 9 out of range"),
        (lambda t: t.replace("3.25\t1", "-3\t1"), r"small\.txt:8: bid amount -3"),
        (lambda t: t.replace("goods 4\n", ""), r"small\.txt:\d+: .*before the 'goods G'"),
        (lambda t: "\x00\xff garbage", r"small\.txt:"),
    ],  # fmt: skip
)
def test_malformed_cats_text_names_file_and_line(tmp_path, edit, message):
    path = tmp_path / "small.txt"
    path.write_bytes(edit(CATS_TEXT).encode("latin-1"))
    with pytest.raises(BundleflowError, match=message):
        load_dataset(path)


# --- files of no accepted format -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("values.csv", b"item0,item1,value\n1,0,3.5\n0,1,2.0\n"),
        ("values.json", b'{"valuations": [[[1, 0, 3.5]]]}'),
        ("values.npy", b"\x93NUMPY\x01\x00v\x00{'descr': '<f4'}"),
        ("values", b"1 0 3.5\n0 1 2.0\n"),  # no suffix, not CATS either
    ],
)
def test_unrecognised_format_names_the_file_and_the_accepted_formats(tmp_path, name, content):
    """Issue 15 item 6: a CSV used to come back as a CATS parse error on line 1."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BundleflowError) as err:
        load_dataset(path)
    message = str(err.value)
    assert message.startswith(f"{path}: not a recognised data file")
    for accepted in (".safetensors", "[N, K, m+1]", ".pt", ".zip", "CATS text", "data convert"):
        assert accepted in message, accepted
    assert "goods" not in message  # not the CATS parser's complaint
    with pytest.raises(BundleflowError, match="not a recognised data file"):
        convert(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_unrecognised_format_through_the_cli_is_exit_2_and_one_line(tmp_path, capsys):
    from bundleflow.cli.app import main

    path = tmp_path / "values.csv"
    path.write_text("item0,item1,value\n1,0,3.5\n")
    assert main(["data", "stats", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bundleflow: error: {path}: not a recognised")


def test_accepted_formats_are_recognised_by_content_under_other_names(tmp_path):
    v = _valuations()
    save_dataset(tmp_path / "v.safetensors", v, {})
    (tmp_path / "ours.data").write_bytes((tmp_path / "v.safetensors").read_bytes())
    torch.save(v, tmp_path / "ref.bin")
    (tmp_path / "cats-output").write_text(CATS_TEXT)  # starts with a %% comment, then 'goods'
    (tmp_path / "cats.dat").write_text(CATS_TEXT.replace("%% a comment\n", ""))
    assert torch.equal(load_dataset(tmp_path / "ours.data").valuations, v)
    assert torch.equal(load_dataset(tmp_path / "ref.bin").valuations, v)
    for name in ("cats-output", "cats.dat"):
        assert load_dataset(tmp_path / name, n_items=4).valuations.shape == (3, 2, 5)
    # CATS text under another name still gets the CATS parser's line-numbered errors
    (tmp_path / "cut.dat").write_text(CATS_TEXT.replace("bids 4", "bids 6"))
    with pytest.raises(BundleflowError, match=r"cut\.dat:\d+: the header announces 6"):
        load_dataset(tmp_path / "cut.dat")


def _fixture_cases():
    if not CATS_FIXTURES.exists():
        return []
    return sorted(json.loads((CATS_FIXTURES / "expected.json").read_text()).items())


@pytest.mark.parametrize(("name", "expected"), _fixture_cases() or [("absent", None)])
def test_real_cats_files_parse_to_documented_counts(name, expected):
    if expected is None:
        pytest.skip(f"{CATS_FIXTURES} not found: ../shared is absent on this machine")
    parsed = read_cats_text(CATS_FIXTURES / name)
    first = parsed.bidders[0]
    got = {
        "goods": parsed.goods,
        "bids": parsed.bids,
        "dummy": parsed.dummy,
        "bid_lines": parsed.bid_lines,
        "bidders": len(parsed.bidders),
        "first_bidder_atoms": len(first),
        "first_bidder_values": [v for v, _ in first],
        "first_bidder_sizes": [len(goods) for _, goods in first],
    }
    assert got == expected
    for bidder in parsed.bidders:  # CATS: every atom of one bidder has the same size
        assert len({len(goods) for _, goods in bidder}) == 1
    data = load_dataset(CATS_FIXTURES / name, n_items=50)
    assert data.valuations.shape[0] == expected["bidders"]


def test_convert_text_to_safetensors_and_pt(tmp_path):
    src = tmp_path / "small.txt"
    src.write_text(CATS_TEXT)
    convert(src, tmp_path / "small.safetensors")
    data = load_dataset(tmp_path / "small.safetensors")
    assert data.metadata["source"]["format"] == "cats-text"
    assert data.metadata["converted_from"]["file"] == "small.txt"
    assert data.split.origin == "recorded"
    convert(tmp_path / "small.safetensors", tmp_path / "small.pt")
    assert torch.equal(torch.load(tmp_path / "small.pt", weights_only=True), data.valuations)


# --- cache --------------------------------------------------------------------------------


def test_cache_generates_once_keyed_by_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("BUNDLEFLOW_CACHE", str(tmp_path / "cache"))
    first = cached_dataset("regions", 9, 25, seed=2)
    assert first.parent == tmp_path / "cache" / "data" and first.exists()

    def no_generation(*args, **kwargs):
        raise AssertionError("a cached set must not be regenerated")

    monkeypatch.setattr(cats_generate, "generate", no_generation)
    assert cached_dataset("regions", 9, 25, seed=2) == first
    monkeypatch.undo()
    monkeypatch.setenv("BUNDLEFLOW_CACHE", str(tmp_path / "cache"))
    other = cached_dataset("regions", 9, 25, seed=3)
    assert other != first
    jumpy = cached_dataset("regions", 9, 25, seed=2, params=cats.CatsParams(jump_prob=0.2))
    assert jumpy not in (first, other)
    # a corrupt cached file is regenerated, bit for bit the same
    good = first.read_bytes()
    first.write_bytes(good[: len(good) // 2])
    assert cached_dataset("regions", 9, 25, seed=2).read_bytes() == good
