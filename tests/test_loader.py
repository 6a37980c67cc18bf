"""The one safe loader (ofaconv.core.loader): a tensor that shows more bytes than it stores, or is
not a dense CPU tensor, is refused with one line naming file and key, for every family and entry
point, before anything is written; torch's own wording never reaches the user."""

from __future__ import annotations

import collections
import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from ofaconv.cli import main as cli
from ofaconv.clip import synth as clip_synth
from ofaconv.core import loader
from ofaconv.core.errors import CheckpointError
from ofaconv.core.loader import check_finite, check_tensors, load_state_dict_file, load_torch, read_folder_state_dict
from ofaconv.ofa.checkpoint import load_checkpoint
from ofaconv.ofa.synth import write_synthetic_checkpoint

from badfiles import expanded_like, write_bad_checkpoint

PACKAGE = Path(__file__).resolve().parents[1] / "ofaconv"
TORCH_WORDING = re.compile(r"weights_only|\x1b\[|torch\.|pytorch\.org|Please|resize storage")


def _torch_wording(message: str, path: Path):
    return TORCH_WORDING.search(message.replace(str(path), ""))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.pt", "ofa-tiny", vocab_size=1000,
                                      ema=True)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return clip_synth.write_vocab(tmp_path_factory.mktemp("vocab") / "vocab.txt")


def _refused_by_cli(argv, src: Path, key: str, work: Path, capsys) -> str:
    """Run the command; it must exit 2 with one line naming file and key and leave nothing in ``work``
    but the source."""
    before = set(work.iterdir())
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ofaconv: error:"), err
    assert str(src) in err and key in err, err
    assert "expanded or overlapping view" in err and not _torch_wording(err, src), err
    assert set(work.iterdir()) == before, "output or a hidden temp sibling left behind"
    return err


# -- stride-0 views, every entry point ---------------------------------------------------------------


def test_expanded_tensor_in_fairseq_checkpoint_refused(tiny, tmp_path, capsys):
    bad = write_bad_checkpoint(tmp_path / "expanded.pt", "expanded_weight", base=tiny)
    stored = load_torch(bad.path)[0]["model"][bad.key]
    assert stored.stride() == (0, 0) and stored.untyped_storage().nbytes() == 4  # the file really holds a view
    _refused_by_cli(["convert", str(bad.path), str(tmp_path / "out")], bad.path, bad.key, tmp_path, capsys)


def test_expanded_ema_tensor_refused_only_when_ema_is_used(tiny, tmp_path):
    raw, _ = load_torch(tiny)
    key = "decoder.layers.0.fc2.weight"
    raw["extra_state"]["ema"][key] = expanded_like(raw["extra_state"]["ema"][key])
    path = tmp_path / "ema.pt"
    torch.save(raw, path)
    load_checkpoint(path)  # the EMA copy is not what gets converted
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, ema=True)
    assert info.value.key == f"extra_state.ema.{key}" and str(path) in str(info.value)


def test_optimizer_state_is_never_checked(tiny, tmp_path):
    """Checks look only at the tensors that are used: the Adam moments stay unread (and mapped)."""
    raw, _ = load_torch(tiny)
    raw["last_optimizer_state"] = {"state": {0: {"exp_avg": torch.zeros(1).expand(64, 64)}}}
    path = tmp_path / "opt.pt"
    torch.save(raw, path)
    assert load_checkpoint(path).has_optimizer_state


def test_expanded_tensor_in_chinese_clip_pt_refused(vocab, tmp_path, capsys):
    state = clip_synth.cnclip_state_dict("ViT-B-16")
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    state[key] = expanded_like(state[key])
    src = tmp_path / "clip_cn_vit-b-16.pt"
    torch.save({"epoch": 1, "step": 2, "name": "x", "state_dict": {f"module.{k}": v for k, v in state.items()}}, src)
    _refused_by_cli(["clip", "convert", str(src), str(tmp_path / "out"), "--vocab", str(vocab)], src,
                    f"module.{key}", tmp_path, capsys)


def test_expanded_tensor_in_pytorch_model_bin_folder_refused(tmp_path, capsys):
    folder = clip_synth.write_legacy_bertclip(tmp_path / "bertclip")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    key = next(k for k, v in state.items() if v.dim() == 2 and v.is_floating_point())
    state[key] = expanded_like(state[key])
    torch.save(state, folder / "pytorch_model.bin")
    _refused_by_cli(["clip", "convert", str(folder), str(tmp_path / "out")], folder / "pytorch_model.bin", key,
                    tmp_path, capsys)


def test_expanded_tensor_in_old_port_folder_refused(tmp_path, capsys):
    folder = tmp_path / "port"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "ofa"}))
    torch.save({"encoder.embed_tokens.weight": torch.zeros(1).expand(1000, 64)}, folder / "pytorch_model.bin")
    _refused_by_cli(["upgrade", str(folder), str(tmp_path / "out")], folder / "pytorch_model.bin",
                    "encoder.embed_tokens.weight", tmp_path, capsys)


def test_sharded_bin_folder_goes_through_the_same_checks(tmp_path):
    torch.save({"a": torch.ones(2, 2)}, tmp_path / "shard-1.bin")
    torch.save({"b": torch.zeros(1).expand(8, 8)}, tmp_path / "shard-2.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"a": "shard-1.bin", "b": "shard-2.bin"}}))
    with pytest.raises(CheckpointError) as info:
        read_folder_state_dict(tmp_path)
    assert info.value.key == "b" and info.value.path == tmp_path / "shard-2.bin"


# -- what check_tensors accepts and refuses ----------------------------------------------------------


def _refused(tensor, tmp_path, match):
    path = tmp_path / "w.bin"
    torch.save({"w": tensor}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's load-time warnings stay inside the loader
        with pytest.raises(CheckpointError, match=match) as info:
            load_state_dict_file(path)
    message = str(info.value)
    assert info.value.key == "w" and str(path) in message and "\n" not in message
    assert not _torch_wording(message, path), message


@pytest.mark.parametrize("make, match", [
    (lambda: torch.eye(3).to_sparse(), "is a sparse tensor; ofaconv converts dense weights only"),
    (lambda: torch.eye(3).to_sparse_csr(), "is a sparse tensor; ofaconv converts dense weights only"),
    (lambda: torch.empty(3, 3, device="meta"), "is a meta tensor"),
    (lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "is a nested tensor"),
    (lambda: torch.zeros(1).expand(4096, 4096), "expanded or overlapping view"),
    (lambda: torch.arange(4.0).as_strided((2, 2), (1, 1)), "expanded or overlapping view"),
    (lambda: torch.arange(6.0).as_strided((2, 3), (2, 1)), "expanded or overlapping view"),
], ids=["sparse_coo", "sparse_csr", "meta", "nested", "expanded", "overlap", "rows-overlap"])
def test_non_dense_and_overlapping_tensors_refused(make, match, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tensor = make()
    _refused(tensor, tmp_path, match)


def test_ordinary_views_accepted(tmp_path):
    """Views that own their bytes: slices, transposes, ties, and the size-1 stride-0 dimension of
    transformers' ``position_ids = arange(n).expand((1, -1))`` buffers."""
    base = torch.randn(8, 6)
    state = {
        "slice": base[2:5, 1:4],
        "step": base[::2],
        "transposed": base.t(),
        "tied": base,
        "position_ids": torch.arange(6).expand((1, -1)),
        "scalar": torch.tensor(3.0),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "views.bin"
    torch.save(state, path)
    loaded = load_state_dict_file(path)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_non_tensor_entry_named():
    with pytest.raises(CheckpointError) as info:
        check_tensors({"w": [1, 2]}, path="f.bin", prefix="model.")
    assert info.value.key == "model.w" and "is a list, expected a tensor" in str(info.value)


# -- error wording ------------------------------------------------------------------------------------


class _Forged:
    """Pickles as a tensor whose view reaches past its storage (torch.save cannot write one itself)."""

    def __init__(self, size, stride, offset=0):
        self.storage = torch.storage.TypedStorage(wrap_storage=torch.zeros(4).untyped_storage(),
                                                  dtype=torch.float32, _internal=True)
        self.args = (offset, size, stride)

    def __reduce_ex__(self, protocol):
        offset, size, stride = self.args
        return (torch._utils._rebuild_tensor_v2, (self.storage, offset, size, stride, False, collections.OrderedDict()))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _write(kind: str, path: Path, tiny: Path) -> None:
    if kind in ("forged_zip", "forged_legacy"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save({"w": _Forged((100,), (1,))}, path, _use_new_zipfile_serialization=kind == "forged_zip")
    elif kind in ("evil_zip", "evil_legacy"):
        torch.save({"w": _Evil()}, path, _use_new_zipfile_serialization=kind == "evil_zip")
    elif kind == "plain_pickle":
        import pickle

        path.write_bytes(pickle.dumps({"state_dict": {"x": _Evil()}}))
    else:
        write_bad_checkpoint(path, kind, base=tiny)


@pytest.mark.parametrize("kind", ["forged_zip", "forged_legacy", "evil_zip", "evil_legacy", "plain_pickle",
                                  "truncated", "random_bytes", "zip_not_torch", "empty"])
def test_messages_are_ours(kind, tiny, tmp_path):
    path = tmp_path / f"{kind}.pt"
    _write(kind, path, tiny)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError) as info:
            load_torch(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert not _torch_wording(message, path), message
    if kind.startswith("evil"):
        assert "refusing to unpickle" in message and ("builtins.print" in message or "(print)" in message)


def test_forged_view_past_its_storage_refused_in_our_words(tmp_path):
    path = tmp_path / "forged.bin"
    _write("forged_zip", path, None)
    with pytest.raises(CheckpointError, match="a tensor reaches outside its stored bytes"):
        load_state_dict_file(path)


def test_check_finite_chunks_and_ignores_integers(monkeypatch):
    monkeypatch.setattr(loader, "_FINITE_CHUNK", 7)
    t = torch.zeros(50, dtype=torch.float16)
    t[33], t[40] = float("nan"), float("-inf")
    with pytest.raises(CheckpointError, match="1 NaN and 1 Inf") as info:
        check_finite({"ids": torch.arange(10), "ok": torch.ones(100), "w": t}, path="f.pt")
    assert info.value.key == "w" and info.value.path == "f.pt"


# -- one loader ---------------------------------------------------------------------------------------


def test_exactly_one_torch_load_call_in_the_package():
    sites = [(path.relative_to(PACKAGE.parent).as_posix(), n)
             for path in sorted(PACKAGE.rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if "torch.load(" in line]
    assert [site for site, _ in sites] == ["ofaconv/core/loader.py"], sites
    unpicklers = [path for path in PACKAGE.rglob("*.py")
                  if re.search(r"\bpickle\.(load|loads|Unpickler)\b|torch\.serialization\.load\b", path.read_text())]
    assert not unpicklers


def test_no_bad_input_writers_ship_in_the_package():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "write_bad_checkpoint" not in text and "__reduce__" not in text, path
