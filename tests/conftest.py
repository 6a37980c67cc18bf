"""Test-wide guards (no network except loopback, a private Hugging Face home) and the session-scoped
fixtures shared across test files: the official fairseq micro checkpoint and converted folders."""

import gzip
import ipaddress
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest

# One intra-op thread, in this process and the commands tests start: results recorded from other
# code (fairseq, ModelScope, earlier runs) are compared bit for bit, and a reduction split over
# threads can move the last bit (as verify runs its checks single-threaded for the same reason); on
# two cores, tiny models run no slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "torch" in sys.modules:  # imported before this file (a plugin): the variable came too late
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _is_loopback(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return True
    host = address[0]
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _guarded_connect(self, address):
    if not _is_loopback(address):
        raise OSError(f"network access blocked in tests: {address!r}")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if not _is_loopback(address):
        raise OSError(f"network access blocked in tests: {address!r}")
    return _real_connect_ex(self, address)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex


@pytest.fixture(autouse=True)
def _private_hf_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.getbasetemp() / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("OFACONV_TEST_HF_OFFLINE", "1"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # torch.compile's C++ cache (hundreds of MB) stays with the run's temp files, not in /tmp.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "torchinductor"))
    yield


# -- converted folders, made once per session with the real commands; copy before editing --------


def _convert_once(tmp_path_factory, name: str, argv):
    from ofaconv.cli import main

    root = tmp_path_factory.mktemp(name)
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HOME", str(root / "hf_home"))
        assert main([*map(str, argv(root)), str(out), "--verify"]) == 0
    return out


@pytest.fixture(scope="session")
def ofa_verified_folder(tmp_path_factory):
    """``ofaconv convert synth:ofa-cn-base OUT --verify``."""
    return _convert_once(tmp_path_factory, "ofa-verified", lambda root: ["convert", "synth:ofa-cn-base"])


@pytest.fixture(scope="session")
def bertclip_verified_folder(tmp_path_factory):
    """``ofaconv clip convert BERTCLIP OUT --verify`` of a synthetic legacy BertCLIP folder (``OUT/../bertclip``)."""
    from ofaconv.clip import synth

    return _convert_once(tmp_path_factory, "bertclip-verified",
                         lambda root: ["clip", "convert", synth.write_legacy_bertclip(root / "bertclip")])


@pytest.fixture(scope="session")
def cnclip_verified_folder(tmp_path_factory):
    """``ofaconv clip convert clip_cn_vit-b-16.pt OUT --vocab VOCAB --verify`` of a synthetic
    Chinese-CLIP checkpoint (``OUT/../src/clip_cn_vit-b-16.pt``)."""
    from ofaconv.clip import synth

    def argv(root):
        vocab = synth.write_vocab(root / "vocab.txt")
        return ["clip", "convert", synth.write_cnclip_pt(root / "src", "ViT-B-16"), "--vocab", vocab]

    return _convert_once(tmp_path_factory, "cnclip-verified", argv)


@pytest.fixture(scope="session")
def micro_converted(tmp_path_factory):
    """``variant -> (folder, source)``: a synthetic micro checkpoint of ``variant`` (default seed, no
    optimizer state) and its conversion (no --verify), made once per variant per session; read-only."""
    from ofaconv.ofa.convert import convert_checkpoint
    from ofaconv.ofa.synth import write_synthetic_checkpoint

    made = {}

    def get(variant: str):
        if variant not in made:
            root = tmp_path_factory.mktemp(f"micro-{variant}")
            src = write_synthetic_checkpoint(root / "src.pt", variant, size="micro", optimizer_state=False)
            made[variant] = (convert_checkpoint(src, root / "hf").out_dir, src)
        return made[variant]

    return get


# -- the official fairseq micro checkpoint (/work/shared/reference, next to the repository) ---------

OFFICIAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference" / "ofa_micro_official"


def official_file(name: str) -> Path:
    """A file of the official fixture; missing is an error (these tests are the parity evidence)."""
    path = OFFICIAL_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"official OFA fixture missing: {path} (the checkpoint and outputs written by the "
                                f"official fairseq code, see {OFFICIAL_DIR / 'README.md'}); the parity tests need it")
    return path


def gunzip_official_checkpoint(target: Path) -> Path:
    with gzip.open(official_file("checkpoint.pt.gz"), "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return target


@pytest.fixture(scope="session")
def official_micro(tmp_path_factory) -> Path:
    """The official micro checkpoint, gunzipped once per session (read-only: copy before editing)."""
    return gunzip_official_checkpoint(tmp_path_factory.mktemp("official") / "checkpoint.pt")


@pytest.fixture(scope="session")
def official_io_path() -> Path:
    """``reference_io.pt``: inputs and the official model's teacher-forced logits for them."""
    return official_file("reference_io.pt")


@pytest.fixture(scope="session")
def official_micro_converted(official_micro, tmp_path_factory) -> Path:
    """``convert_checkpoint(official micro, OUT, verify=True)``, which must pass; copy before editing."""
    from ofaconv.ofa.convert import convert_checkpoint

    result = convert_checkpoint(official_micro, tmp_path_factory.mktemp("official-converted") / "out", verify=True)
    assert result.passed, result.report["checks"]
    return result.out_dir
