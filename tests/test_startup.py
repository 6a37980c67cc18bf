"""Start-up cost: `import ofaconv` is cheap, the Auto registration happens when transformers' factory
modules load (in either import order), `ofaconv convert` never imports the transformers model,
trainer or image machinery, and the source hash is exact and can be stopped."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import subprocess
import sys
import threading

import pytest

from ofaconv.core.digest import BackgroundSha256, file_sha256

HEAVY = ("transformers.modeling_utils", "transformers.processing_utils", "transformers.trainer", "torchvision")


def run_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_import_ofaconv_imports_neither_torch_nor_transformers():
    out = run_python("import sys, ofaconv; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    assert out.strip() == "[]"


@pytest.mark.parametrize("order", ["ofaconv-first", "transformers-first"])
def test_auto_classes_resolve_in_either_import_order(converted_cn, order):
    imports = ("import ofaconv\nfrom transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoProcessor, AutoImageProcessor"
               if order == "ofaconv-first" else
               "from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoProcessor, AutoImageProcessor\nimport ofaconv")
    out = run_python(f"""
{imports}
import json
folder = {str(converted_cn)!r}
print(json.dumps([type(AutoConfig.from_pretrained(folder)).__module__,
                  type(AutoModelForSeq2SeqLM.from_pretrained(folder)).__module__,
                  type(AutoProcessor.from_pretrained(folder)).__module__,
                  type(AutoImageProcessor.from_pretrained(folder)).__module__]))
""")
    assert json.loads(out.strip().splitlines()[-1]) == [
        "ofaconv.ofa.modeling.configuration_ofa",
        "ofaconv.ofa.modeling.modeling_ofa",
        "ofaconv.ofa.modeling.processing_ofa",
        "ofaconv.ofa.modeling.image_processing_ofa",
    ]


def test_convert_command_skips_the_heavy_imports(cn_checkpoint, tmp_path):
    src = cn_checkpoint
    out = run_python(f"""
import sys
from ofaconv.cli import main
assert main(["convert", {str(src)!r}, {str(tmp_path / "out")!r}]) == 0
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
""")
    assert out.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def cn_checkpoint(tmp_path_factory):
    from ofaconv.ofa.synth import write_synthetic_checkpoint

    src = tmp_path_factory.mktemp("startup") / "cn.pt"
    write_synthetic_checkpoint(src, "ofa-cn-base", size="micro")
    return src


@pytest.fixture(scope="module")
def converted_cn(cn_checkpoint):
    from ofaconv.ofa.convert import convert_checkpoint

    return convert_checkpoint(cn_checkpoint, cn_checkpoint.parent / "out").out_dir


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 3 * 4096 + 17])
def test_file_sha256_matches_hashlib(tmp_path, size):
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))
    assert file_sha256(path, chunk_bytes=4096) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert BackgroundSha256(path).result() == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="multiple of the page size"):
        file_sha256(path, chunk_bytes=1000)


def test_file_sha256_stops_when_asked(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 3 * 4096)
    stop = threading.Event()
    stop.set()
    with pytest.raises(concurrent.futures.CancelledError):
        file_sha256(path, chunk_bytes=4096, stop=stop)
    background = BackgroundSha256(path)
    background.cancel()
    try:
        background.result()  # finished before the cancel, or stopped by it
    except concurrent.futures.CancelledError:
        pass
