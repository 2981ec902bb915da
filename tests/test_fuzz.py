"""Fuzzing every reader with hypothesis: the only outcomes allowed are success or
:class:`BundleflowError` (which the CLI turns into exit 2 and one line).

Readers: data files (our safetensors, the reference ``[N, K, m+1]`` ``.pt``, a ``.zip``
holding one, CATS text), checkpoint manifests and components, the frozen mechanism file,
the config loader (preset YAML and ``--set``). 1,000 derandomised examples each (the
``bundleflow`` hypothesis profile in conftest.py); inputs are kept small so the whole
module runs in about a minute on two cores.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save

from bundleflow.errors import BundleflowError
from bundleflow.evaluation.mechanism import FrozenMechanism
from bundleflow.train.checkpoint import MANIFEST, latest, read_checkpoint, write_checkpoint
from bundleflow.train.config import load_config, parse_set, to_flat_dict
from bundleflow.valuations.dataset import load_dataset
from bundleflow.valuations.tensor_files import save_dataset
from tests.conftest import cli_error, run_cli, single_torch_thread

EXAMPLES = 1000
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=settings.default.derandomize,  # True: conftest's "bundleflow" profile
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
COUNTS: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: threads only cost time on a shared 2-core machine."""
    yield from single_torch_thread()


@pytest.fixture(scope="module")
def work():
    """One scratch directory for all examples (hypothesis reuses function fixtures)."""
    path = Path(tempfile.mkdtemp(prefix="bundleflow-fuzz-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _only_bundleflow_errors(name: str, fn, *args, **kw):
    COUNTS[name] = COUNTS.get(name, 0) + 1
    try:
        return fn(*args, **kw)
    except BundleflowError as err:
        assert str(err) and "\n" not in str(err), f"{name}: message not one line: {err!r}"
        return None


# --------------------------------------------------------------------------- strategies

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
          torch.int32, torch.uint8, torch.bool]  # fmt: skip
SPECIAL = [0.0, 1.0, -1.0, float("nan"), float("inf"), -float("inf"), 0.5, 1e30]


@st.composite
def tensors(draw, max_rank: int = 4, max_dim: int = 4) -> torch.Tensor:
    """Small tensors of random rank, shape, dtype; values from 0/1 atoms, specials, noise."""
    rank = draw(st.integers(0, max_rank))
    shape = draw(st.lists(st.integers(0, max_dim), min_size=rank, max_size=rank))
    dtype = draw(st.sampled_from(DTYPES))
    n = 1
    for s in shape:
        n *= s
    style = draw(st.sampled_from(["xor", "specials", "ints"]))
    if style == "xor" and rank == 3 and n:
        # Seeded by a draw: the same choices must give the same tensor (else whether a file
        # of ours can be written, and so what is drawn next, varies: a flaky strategy).
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
        t = (torch.rand(*shape, generator=g) < 0.5).float()
        t[..., -1] = torch.rand(shape[:-1], generator=g) * 10 * (t[..., :-1].sum(-1) > 0)
    elif style == "specials":
        values = draw(st.lists(st.sampled_from(SPECIAL), min_size=n, max_size=n))
        t = torch.tensor(values, dtype=torch.float64).reshape(shape)
    else:
        values = draw(st.lists(st.integers(-2, 3), min_size=n, max_size=n))
        t = torch.tensor(values, dtype=torch.float64).reshape(shape)
    if dtype.is_floating_point:
        return t.to(dtype)
    return torch.nan_to_num(t, nan=0, posinf=1, neginf=-1).clamp(-1, 3).to(dtype)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def mutated(draw, blob: bytes) -> bytes:
    """``blob`` as is, truncated, with bytes overwritten or inserted, or random bytes."""
    how = draw(st.sampled_from(["keep", "truncate", "flip", "insert", "random"]))
    if how == "keep" or not blob:
        return blob
    if how == "truncate":
        return blob[: draw(st.integers(0, len(blob) - 1))]
    if how == "random":
        return draw(st.binary(max_size=256))
    out = bytearray(blob)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(out) - 1))
        if how == "flip":
            out[at] = draw(st.integers(0, 255))
        else:
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(out)


def _safetensors_blob(draw, named: dict[str, torch.Tensor], metadata: dict | None) -> bytes:
    meta = None if metadata is None else {k: json.dumps(v) for k, v in metadata.items()}
    return st_save({k: v.contiguous() for k, v in named.items()}, metadata=meta)


# --------------------------------------------------------------------------- data readers


@st.composite
def our_files(draw) -> bytes:
    t = draw(tensors())
    if draw(st.booleans()) and t.dim() == 3 and t.numel():
        try:  # a valid file of ours, to mutate
            buf = io.BytesIO()
            path = Path(tempfile.mkdtemp()) / "v.safetensors"
            save_dataset(path, t, {"split": draw(json_values)})
            blob = path.read_bytes()
            shutil.rmtree(path.parent)
            return draw(mutated(blob))
        except BundleflowError:
            buf.close()
    name = draw(st.sampled_from(["valuations", "x"]))
    named = {name: t}
    if draw(st.booleans()):
        named["other"] = draw(tensors(max_rank=2))
    metadata = draw(
        st.none()
        | st.fixed_dictionaries(
            {"bundleflow": json_values},
            optional={"shape": json_values, "split": json_values, "sha256": st.text(max_size=4)},
        )
    )
    if metadata is not None:
        metadata = {"bundleflow": {k: v for k, v in metadata.items()}}
    return draw(mutated(_safetensors_blob(draw, named, metadata)))


@settings(FUZZ)
@given(blob=our_files(), n_items=st.none() | st.integers(0, 4))
def test_fuzz_our_safetensors(work, blob, n_items):
    path = work / "data.safetensors"
    path.write_bytes(blob)
    _only_bundleflow_errors("data .safetensors", load_dataset, path, n_items=n_items)


def _torch_blob(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


torch_objects = st.one_of(
    tensors(),
    st.dictionaries(st.text(max_size=6), tensors(), max_size=3),
    st.lists(tensors(), max_size=2),
    st.tuples(tensors()),
    json_values,
)


@settings(FUZZ)
@given(obj=torch_objects, data=st.data())
def test_fuzz_reference_pt(work, obj, data):
    blob = data.draw(mutated(_torch_blob(obj)))
    suffix = data.draw(st.sampled_from([".pt", ".pth", ""]))
    path = work / f"ref{suffix}"
    path.write_bytes(blob)
    _only_bundleflow_errors("data .pt", load_dataset, path)


@settings(FUZZ)
@given(obj=torch_objects, data=st.data())
def test_fuzz_reference_zip(work, obj, data):
    inner_name = data.draw(
        st.sampled_from(["data/cats.pt", "v.pth", "x.safetensors", "__MACOSX/v.pt", "a.txt"])
    )
    if inner_name.endswith(".safetensors"):
        inner = _safetensors_blob(None, {"valuations": data.draw(tensors())}, None)
    else:
        inner = _torch_blob(obj)
    inner = data.draw(mutated(inner))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr(inner_name, inner)
        if data.draw(st.booleans()):
            archive.writestr(data.draw(st.sampled_from(["b.pt", "readme"])), b"x")
    blob = data.draw(mutated(buf.getvalue()))
    path = work / "ref.pt.zip"
    path.write_bytes(blob)
    _only_bundleflow_errors("data .pt.zip", load_dataset, path)


def _token():
    return st.one_of(
        st.integers(-3, 12).map(str),
        st.sampled_from(
            [
                "#",
                "goods",
                "bids",
                "dummy",
                "%",
                "nan",
                "inf",
                "1e400",
                "-0",
                "0.5",
                "1_0",
                "٣",
                "",
                "x",
            ]
        ),  # fmt: skip
        st.text(max_size=3),
    )


@st.composite
def cats_texts(draw) -> bytes:
    lines = []
    for key in draw(st.permutations(["goods", "bids", "dummy"]))[: draw(st.integers(0, 3))]:
        lines.append(f"{key} {draw(st.integers(-1, 6) | st.text(max_size=2))}")
    for i in range(draw(st.integers(0, 6))):
        if draw(st.integers(0, 3)) == 0:
            lines.append(" ".join(draw(st.lists(_token(), max_size=6))))
        else:
            goods = draw(st.lists(st.integers(-1, 8), min_size=0, max_size=4))
            amount = draw(st.sampled_from(["3.5", "0", "-1", "nan", "inf", "1e3"]))
            lines.append(" ".join([str(i), amount, *map(str, goods), "#"]))
    text = "\n".join(lines).encode()
    return draw(mutated(text))


@settings(FUZZ)
@given(blob=cats_texts(), suffix=st.sampled_from([".txt", ".cats", ""]))
def test_fuzz_cats_text(work, blob, suffix):
    path = work / f"cats{suffix}"
    path.write_bytes(blob)
    _only_bundleflow_errors("data CATS text", load_dataset, path)


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def good_checkpoint(work):
    parts = {
        "menu": {"means": torch.randn(4, 2, 3), "prices": torch.rand(4)},
        "rng": {"batch": torch.arange(8, dtype=torch.uint8)},
    }
    return write_checkpoint(work / "good" / "step-000000001", parts, step=1, extra={"a": 1})


manifest_edits = st.one_of(
    json_values.map(lambda v: ("replace", v)),
    st.tuples(
        st.just("set"),
        st.sampled_from(["format", "step", "files", "config", "extra", "junk"]),
        json_values,
    ),
    st.tuples(st.just("del"), st.sampled_from(["format", "step", "files", "config", "extra"])),
    st.tuples(st.just("file"), st.text(max_size=12), st.text(max_size=64)),
)


@settings(FUZZ)
@given(edit=manifest_edits, data=st.data())
def test_fuzz_checkpoint(work, good_checkpoint, edit, data):
    parent = work / "ckpts"
    shutil.rmtree(parent, ignore_errors=True)
    target = parent / "step-000000002"
    shutil.copytree(good_checkpoint, target)
    manifest = json.loads((target / MANIFEST).read_text())
    if edit[0] == "replace":
        manifest = edit[1]
    elif edit[0] == "set":
        manifest[edit[1]] = edit[2]
    elif edit[0] == "del":
        del manifest[edit[1]]
    else:
        manifest["files"][edit[1]] = edit[2]
    raw = json.dumps(manifest).encode()
    (target / MANIFEST).write_bytes(data.draw(mutated(raw)))
    component = data.draw(st.sampled_from(["menu.safetensors", "rng.safetensors"]))
    blob = (target / component).read_bytes()
    (target / component).write_bytes(data.draw(mutated(blob)))
    found = _only_bundleflow_errors("checkpoint latest()", latest, parent)
    assert found in (None, target)
    _only_bundleflow_errors("checkpoint read", read_checkpoint, target)


# --------------------------------------------------------------------------- mechanism


@st.composite
def mechanism_files(draw) -> bytes:
    j, d, m = draw(st.integers(0, 3)), draw(st.integers(0, 3)), draw(st.integers(0, 3))
    names = {
        "bundles": (j, d, m),
        "alpha": (j, d),
        "prices": (j,),
        "eps": (j, d, m),
        "fallback_item_prices": (m,),  # optional: the posted-price fallback
        "fallback_size_prices": (m + 1,),
    }
    named = {}
    for name, shape in names.items():
        how = draw(st.sampled_from(["right", "right", "random", "missing"]))
        if how == "missing":
            continue
        if how == "random":
            named[name] = draw(tensors(max_rank=3, max_dim=3))
        else:
            t = draw(tensors(max_rank=0))
            named[name] = torch.full(shape, float(t.double()) if t.numel() else 0.0).to(t.dtype)
    header = draw(
        json_values
        | st.fixed_dictionaries(
            {"format": st.sampled_from([1, 1, 2, "1", None])},
            optional={
                "mix_temp": json_values,
                "inv_temp": json_values,
                "n_steps": json_values,
                "money_scale": json_values,
                "meta": json_values,
            },
        )
    )
    meta = draw(
        st.sampled_from(["json", "json", "none", "garbage"]).map(
            lambda k: {
                "json": {"bundleflow.mechanism": json.dumps(header)},
                "none": None,
            }.get(k, {"bundleflow.mechanism": "{not json"})
        )
    )
    if not named:
        named = {"x": torch.zeros(1)}
    return draw(mutated(st_save(named, metadata=meta)))


@settings(FUZZ)
@given(blob=mechanism_files())
def test_fuzz_mechanism_file(work, blob):
    path = work / "mechanism.safetensors"
    path.write_bytes(blob)
    _only_bundleflow_errors("FrozenMechanism.load", FrozenMechanism.load, path)


# --------------------------------------------------------------------------- config

KEYS = sorted(to_flat_dict(load_config()))
config_values = st.one_of(
    json_values,
    st.sampled_from([0, -1, 1, 2.5, "1e-3", "fast", "cats", "cpu", None, True, [1, 2], {}]),
)


@st.composite
def config_trees(draw) -> dict:
    out: dict = {}
    for _ in range(draw(st.integers(0, 5))):
        key = draw(st.sampled_from(KEYS) | st.text(max_size=6))
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                break
            node = nxt
        else:
            node[parts[-1]] = draw(config_values)
    return out


@settings(FUZZ)
@given(
    tree=config_trees(),
    how=st.sampled_from(["yaml", "text", "bytes"]),
    text=st.text(max_size=40),
    raw=st.binary(max_size=40),
)
def test_fuzz_config_preset(work, tree, how, text, raw):
    path = work / "preset.yaml"
    if how == "yaml":
        path.write_text(yaml.safe_dump(tree))
    elif how == "text":
        path.write_text(text)
    else:
        path.write_bytes(raw)
    _only_bundleflow_errors("load_config(preset)", load_config, str(path))


@settings(FUZZ)
@given(
    items=st.lists(
        st.one_of(
            st.tuples(st.sampled_from(KEYS), config_values.map(json.dumps)).map("=".join),
            st.tuples(st.sampled_from(KEYS) | st.text(max_size=8), st.text(max_size=8)).map(
                "=".join
            ),
            st.text(max_size=12),
        ),
        max_size=4,
    )
)
def test_fuzz_config_set(items):
    def load():
        return load_config(None, parse_set(items))

    _only_bundleflow_errors("parse_set + load_config", load)


# --------------------------------------------------------------------------- reference flow


REFERENCE_KEYS = [f"{layer}.{kind}" for layer in ("fc1", "fc2", "fc3", "fct1", "fct2")
                  for kind in ("weight", "bias")]  # fmt: skip


@st.composite
def flow_state_dicts(draw):
    """A valid reference flow state dict with keys dropped, tensors replaced by random ones
    (shapes, dtypes, NaNs), or not a dict at all."""
    from bundleflow.maths.flow import VelocityField

    m, h = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    state = dict(VelocityField(m, h, h).state_dict())
    how = draw(st.sampled_from(["keep", "drop", "replace", "not-a-dict"]))
    if how == "not-a-dict":
        return draw(tensors())
    if how == "drop":
        state.pop(draw(st.sampled_from(REFERENCE_KEYS)))
    if how == "replace":
        for key in draw(st.lists(st.sampled_from(REFERENCE_KEYS), min_size=1, max_size=3)):
            state[key] = draw(tensors(max_rank=3))
    return state


@settings(FUZZ)
@given(state=flow_state_dicts(), data=st.data())
def test_fuzz_reference_flow(work, state, data):
    """The public code's flow .pth (``load_reference_flow``): saved, then perhaps damaged."""
    from bundleflow.maths.flow import load_reference_flow

    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = work / "flow.pth"
    path.write_bytes(data.draw(mutated(buffer.getvalue())))
    _only_bundleflow_errors("reference flow .pth", load_reference_flow, path)


def test_fuzz_counts_reach_the_brief():
    """Runs last (file order): every reader saw its 1,000 examples."""
    short = {k: v for k, v in COUNTS.items() if v < EXAMPLES}
    if not COUNTS:
        pytest.skip("run with the fuzz tests (this module) to count")
    assert not short, short
    sys.stderr.write(f"\nfuzz examples per reader: {json.dumps(COUNTS)}\n")


# --------------------------------------------------------------------------- the CLI


BAD_FILES = {
    "random bytes.pt": b"\x00\x01 not data",
    "truncated.zip": b"PK\x03\x04trunc",
    "short.txt": b"goods 3\nbids 2\n0 1.0 0 #\n",
    "nan.txt": b"goods 2\nbids 1\n0 nan 0 #\n",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_cli_bad_data_file_is_exit_2_and_one_line(tmp_path, capsys, name):
    from bundleflow.cli.app import main

    bad = tmp_path / name
    bad.write_bytes(BAD_FILES[name])
    assert main(["data", "stats", str(bad)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bundleflow: error: {bad}"), lines


def test_cli_bad_data_file_in_a_real_process(tmp_path):
    """The same through the console entry point: exit 2, one line, no traceback."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02}q\x00(X")  # a pickle cut short
    out = run_cli("data", "stats", str(bad), env={"BUNDLEFLOW_CACHE": str(tmp_path / "cache")})
    cli_error(out)
