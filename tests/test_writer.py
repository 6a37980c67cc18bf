"""Streaming safetensors writer: round trips, sharding, determinism, one tensor alive at a time."""

import hashlib
import json
import os
import weakref

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ofaconv.core.errors import OfaconvError
from ofaconv.core.writer import plan_shards, write_shards


def sample() -> dict[str, torch.Tensor]:
    """Mixed widths, so layout alignment matters: odd-length fp16 casts next to int64 buffers."""
    g = torch.Generator().manual_seed(0)
    return {
        "encoder.embed_tokens.weight": torch.randn(11, 7, generator=g),
        "encoder.layers.0.self_attn.c_attn": torch.randn(3, generator=g),
        "encoder.token_rp_bucket": torch.arange(15, dtype=torch.int64).reshape(3, 5),
        "encoder.layers.0.fc1.bias": torch.randn(5, generator=g, dtype=torch.float64),
        "encoder.embed_images.bn1.num_batches_tracked": torch.tensor(7),
        "encoder.layers.10.fc1.weight": torch.randn(4, 3, generator=g).t(),  # not contiguous
        "decoder.mask": torch.tensor([True, False, True]),
        "decoder.empty": torch.zeros(0, 4),
        "decoder.scale": torch.tensor(2.5),
    }


def items_of(state, log=None):
    def thunk(name):
        def load():
            if log is not None:
                log.append(name)
            return state[name]

        return load

    return [(name, tuple(t.shape), t.dtype, thunk(name)) for name, t in state.items()]


def file_sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(params=[None, 24], ids=["one-chunk", "24-byte-chunks"])
def chunk(request, monkeypatch):
    """Tensors go through staging buffers chunk by chunk; tiny chunks split every tensor (and
    leave a short last chunk) so the chunk seams are exercised."""
    if request.param is not None:
        monkeypatch.setattr("ofaconv.core.writer.CHUNK_BYTES", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [None, "fp32", "fp16", "bf16"])
def test_round_trip(tmp_path, dtype, chunk):
    state = sample()
    result = write_shards(tmp_path, items_of(state), dtype=dtype)
    assert result.index is None and list(result.files) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert set(loaded) == set(state)
    cast = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype)
    for name, tensor in state.items():
        want = tensor.to(cast) if cast is not None and tensor.is_floating_point() else tensor
        assert loaded[name].dtype == want.dtype, name
        assert torch.equal(loaded[name], want), name
    info = result.files["model.safetensors"]
    assert info == {"sha256": file_sha(tmp_path / "model.safetensors"), "size": (tmp_path / "model.safetensors").stat().st_size}
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert result.total_size == sum(t.numel() * (cast or t.dtype).itemsize if t.is_floating_point() else t.nbytes for t in state.values())


def test_sharding_and_index(tmp_path):
    sizes = [100, 100, 100, 300, 50, 50, 20]  # float32 elements; cap 1200 bytes
    state = {f"layers.{i}.w": torch.full((n,), float(i)) for i, n in enumerate(sizes)}
    result = write_shards(tmp_path, items_of(state), max_shard_size=1200)
    names = [f"model-0000{i}-of-00003.safetensors" for i in range(1, 4)]
    # greedy in order: [400, 400, 400] bytes fill the cap exactly, [1200], then [200, 200, 80]
    expected = {"layers.0.w": 0, "layers.1.w": 0, "layers.2.w": 0, "layers.3.w": 1, "layers.4.w": 2, "layers.5.w": 2, "layers.6.w": 2}
    assert result.index["weight_map"] == {k: names[v] for k, v in expected.items()}
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index == result.index
    assert index["metadata"] == {"total_size": 4 * sum(sizes)}
    assert sorted(result.files) == sorted(names + ["model.safetensors.index.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(result.files)
    for name, info in result.files.items():
        assert info["sha256"] == file_sha(tmp_path / name)
    merged = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(tmp_path / shard)
        assert all(index["weight_map"][k] == shard for k in tensors)
        merged.update(tensors)
    assert merged.keys() == state.keys() and all(torch.equal(merged[k], state[k]) for k in state)


def test_greedy_split_keeps_order_and_isolates_oversized():
    sizes = [100, 100, 100, 400, 50, 50, 20]
    state = {f"t{i}": torch.zeros(n) for i, n in enumerate(sizes)}
    shards = plan_shards(items_of(state), max_shard_size=1200)
    assert [[t.name for t in shard] for shard in shards] == [["t0", "t1", "t2"], ["t3"], ["t4", "t5", "t6"]]
    shards = plan_shards(items_of(state), max_shard_size=1200, dtype="fp16")
    assert [[t.name for t in shard] for shard in shards] == [["t0", "t1", "t2"], ["t3", "t4", "t5", "t6"]]
    assert len(plan_shards(items_of(state), max_shard_size=10**9)) == 1


def test_byte_identical_output(tmp_path):
    sizes = [100, 100, 100, 300, 50]
    state = {f"layers.{i}.w": torch.randn(n) for i, n in enumerate(sizes)}
    one = write_shards(tmp_path / "a", items_of(state), max_shard_size=1000, dtype="bf16")
    two = write_shards(tmp_path / "b", items_of(state), max_shard_size=1000, dtype="bf16")
    assert one.files == two.files and len(one.files) == 3
    for name in one.files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("dtype, cap", [(None, 10**9), ("fp16", 10**9), ("bf16", 5000)])
def test_one_tensor_alive_at_a_time(tmp_path, dtype, cap):
    """Each thunk runs once, in data order, after every earlier tensor's memory was released."""
    alive: list[weakref.ref] = []
    calls: list[int] = []

    def thunk(i):
        def load():
            assert all(ref() is None for ref in alive), f"tensor {calls[-1]} still referenced when {i} is read"
            calls.append(i)
            buffer = np.full((64, 8), i, dtype=np.float32)  # the tensor's storage: dies with its last view
            alive.append(weakref.ref(buffer))
            return torch.from_numpy(buffer)

        return load

    items = [(f"layers.{i}.w", (64, 8), torch.float32, thunk(i)) for i in range(12)]
    shards = plan_shards(items, max_shard_size=cap, dtype=dtype)
    assert calls == []  # planning reads no data
    write_shards(tmp_path, items, max_shard_size=cap, dtype=dtype)
    assert calls == list(range(12)) and len(shards) == (1 if cap > 5000 else 3)
    assert all(ref() is None for ref in alive)


def test_thunks_follow_layout_order_within_a_shard(tmp_path):
    log: list[str] = []
    state = {"a": torch.zeros(3, dtype=torch.float16), "b": torch.zeros(1, dtype=torch.int64), "c": torch.zeros(2)}
    write_shards(tmp_path, items_of(state, log))
    assert log == ["b", "c", "a"]  # widest elements first keeps every tensor aligned
    with open(tmp_path / "model.safetensors", "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    assert (8 + length) % 8 == 0
    assert [header[k]["data_offsets"] for k in "bca"] == [[0, 8], [8, 16], [16, 22]]
    assert list(header) == ["__metadata__", "b", "c", "a"]


@pytest.mark.parametrize(
    "value, dtype, message",
    [
        (float("nan"), None, "tensor holds NaN or Inf values"),
        (float("inf"), "bf16", "tensor holds NaN or Inf values"),
        (1e6, "fp16", "tensor overflows float16 (finite in float32)"),
    ],
)
def test_non_finite_is_refused_with_key_and_path(tmp_path, value, dtype, message, chunk):
    state = {"ok": torch.ones(4), "encoder.layers.3.fc2.weight": torch.tensor([1.0] * 9 + [value])}
    with pytest.raises(OfaconvError) as info:
        write_shards(tmp_path, items_of(state), dtype=dtype, source_path="ckpt.pt")
    assert str(info.value) == f"ckpt.pt: key 'encoder.layers.3.fc2.weight': {message}"
    assert list(tmp_path.iterdir()) == []  # no partial output
    write_shards(tmp_path, items_of(state), dtype=dtype, check_finite=False)
    assert load_file(tmp_path / "model.safetensors")["ok"].sum() == 4


def test_non_finite_early_in_a_tensor_stops_the_write(tmp_path, chunk):
    """The uncast NaN/Inf check runs on the hashing thread, a chunk behind the writes: a NaN in the
    first chunk of a tensor with more chunks and more shards after it still fails the write, names
    its key and leaves nothing."""
    bad = torch.ones(40)
    bad[0] = float("nan")
    state = {"a": torch.ones(4), "bad": bad, **{f"later{i}": torch.ones(40) for i in range(3)}}
    with pytest.raises(OfaconvError, match="key 'bad': tensor holds NaN or Inf values"):
        write_shards(tmp_path, items_of(state), max_shard_size=200, source_path="ckpt.pt")
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_way_leaves_nothing(tmp_path):
    state = {f"t{i}": torch.zeros(100) for i in range(6)}
    items = items_of(state)
    items[4] = ("t4", (100,), torch.float32, lambda: torch.zeros(99))
    with pytest.raises(OfaconvError, match=r"key 't4': tensor is \(99,\) torch.float32, the plan said \(100,\) torch.float32"):
        write_shards(tmp_path, items, max_shard_size=800)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "items, kwargs, message",
    [
        ([("a", (1,), torch.float32, None), ("a", (1,), torch.float32, None)], {}, "key 'a': tensor name given twice"),
        ([("a", (1,), torch.complex64, None)], {}, "unsupported dtype"),
        ([("a", (1,), torch.float32, None)], {"dtype": "fp8"}, "unsupported dtype 'fp8'"),
        ([("a", (1,), torch.float32, None)], {"dtype": torch.int8}, "output dtype must be a floating type"),
        ([], {}, "no tensors to write"),
    ],
)
def test_bad_plans(tmp_path, items, kwargs, message):
    with pytest.raises(OfaconvError, match=message):
        write_shards(tmp_path, items, **kwargs)


def test_loads_with_transformers_from_pretrained(tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    torch.manual_seed(0)
    model = BertModel(config).eval()
    state = model.state_dict()
    result = write_shards(tmp_path, items_of(state), max_shard_size=20_000, progress=True)
    assert result.index is not None and len(result.files) > 3
    config.save_pretrained(tmp_path)
    loaded = BertModel.from_pretrained(tmp_path).eval()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    inputs = torch.tensor([[2, 5, 9, 3]])
    assert torch.equal(loaded(inputs).last_hidden_state, model(inputs).last_hidden_state)


def test_write_safetensors_names_one_file_and_hashes_it_as_written(tmp_path, chunk):
    from ofaconv.core.writer import write_safetensors

    state = sample()
    path = tmp_path / "sub" / "text_projection.safetensors"
    path.parent.mkdir()
    entry = write_safetensors(path, state)
    assert sorted(p.name for p in path.parent.iterdir()) == ["text_projection.safetensors"]
    assert entry == {"sha256": file_sha(path), "size": path.stat().st_size}
    loaded = load_file(str(path))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="safetensors"):
        write_safetensors(tmp_path / "weights.bin", state)


def test_stem_names_shards_and_index(tmp_path):
    result = write_shards(tmp_path, items_of(sample()), max_shard_size=64, stem="adapter")
    import re

    shards = [n for n in result.files if n != "adapter.safetensors.index.json"]
    assert len(shards) == len(result.files) - 1 > 1
    assert all(re.fullmatch(rf"adapter-\d{{5}}-of-{len(shards):05d}\.safetensors", n) for n in shards)
    assert set(result.index["weight_map"].values()) == set(shards)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(result.files)


def test_atomic_file_follows_the_umask_and_leaves_nothing_on_failure(tmp_path):
    from ofaconv.core.writer import atomic_file, write_atomic

    old = os.umask(0o022)
    try:
        path = write_atomic(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert path.read_text() == "{}" and path.stat().st_mode & 0o777 == 0o644
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "b.bin") as handle:
        handle.write(b"half")
        raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
