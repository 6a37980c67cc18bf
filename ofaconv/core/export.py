"""``ofaconv export onnx FOLDER OUT``: a converted folder of any family as ONNX graphs, checked
against PyTorch when they are written.

The core checks that FOLDER holds exactly what its report lists, finds the folder's family
(:func:`ofaconv.core.registry.family_of_folder`) and calls the family hook
``export_onnx(folder, out_dir, *, threads=None) -> {"graphs": {...}, "checks": [...]}``, which
writes its graphs into ``out_dir`` (the output's temp sibling) with :func:`trace` and measures them
against PyTorch with :func:`parity_row`. OUT then gets the folder's small configuration and
tokenizer files (``*.json``, ``*.txt``) and a ``conversion_report.json`` (kind ``conversion``,
``format: onnx``) with every parity row; a failed row leaves no output and exits 3.

Graphs are traced with torch's TorchScript exporter: OFA's modeling branches on data
(``bool(mask.any())``), which ``torch.export`` refuses, and tracing takes the branch of the
example inputs (the families pick examples whose branch is exact for every input).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from . import registry
from .errors import OfaconvError, VerificationError
from .report import REPORT_NAME, SCHEMA, load_report

__all__ = ["export_onnx", "trace", "parity_row", "max_abs_diff", "inference_session", "GATE", "OPSET"]

GATE = 1e-4  # max abs difference of an ONNX output from PyTorch's (fp32)
OPSET = 17
_PROTOBUF_LIMIT = 2**31 - 1  # larger graphs keep their weights in one NAME.data file beside them
_OWN_KEYS = ("schema", "kind", "files", "checks", "passed", "ofaconv_version", "versions")


# -- for the families' hooks ------------------------------------------------------------------------
def trace(module, args: tuple, path: Path, *, inputs: list[str], outputs: list[str], dynamic_axes: dict) -> None:
    """Trace ``module`` (put in eval mode) on ``args`` into the ONNX file ``path``."""
    import torch

    path = Path(path)
    module.eval()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
        raw = Path(scratch) / path.name
        with torch.no_grad():
            torch.onnx.export(module, args, str(raw), input_names=inputs, output_names=outputs,
                              dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False)
        _save(_repaired(_load(raw)), path)


def inference_session(path, threads: int | None = None):
    """An onnxruntime CPU session; ``threads`` caps its intra-op threads (default: all cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def max_abs_diff(got, expected) -> float:
    """Largest absolute difference of two arrays (booleans compared as 0/1); inf on a shape mismatch."""
    import numpy as np

    got, expected = np.asarray(got), np.asarray(expected)
    if got.shape != expected.shape:
        return float("inf")
    if got.size == 0:
        return 0.0
    return float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max())


def parity_row(name: str, value: float, *, gate: float = GATE, metric: str = "max_abs_diff", detail: str = "") -> dict:
    """A report check row: passed when ``value <= gate``."""
    return {"name": name, "passed": bool(value <= gate), "metric": metric, "value": value, "gate": gate,
            "detail": detail}


# -- the command ------------------------------------------------------------------------------------
def export_onnx(folder, out, *, force: bool = False, threads: int | None = None) -> dict:
    """Write ``folder`` (any family's converted folder) as ONNX graphs into ``out``; returns the
    report written there. Raises :class:`VerificationError` when a graph misses its gate."""
    from .verify import manifest_check
    from .writer import OutputFolder

    folder = Path(folder)
    _require_onnx()
    if not folder.is_dir():
        raise OfaconvError("not a directory; give a folder written by ofaconv", path=folder)
    family = registry.family_of_folder(folder)
    hooks = family.load_hooks()
    if not hasattr(hooks, "export_onnx"):
        raise OfaconvError(f"the {family.name} family has no ONNX export", path=folder)
    row, prefix = manifest_check(folder)
    if prefix:
        raise OfaconvError(f"a part of the folder {folder.parent}: export that folder", path=folder)
    if not row["passed"]:
        raise OfaconvError(f"{row['detail']}; export only a folder ofaconv wrote, as it wrote it", path=folder)
    source = load_report(folder)
    with OutputFolder(out, force=force, protect=[folder]) as target:
        with target.recording():
            result = hooks.export_onnx(folder, target.path, threads=threads)
            _copy_side_files(folder, target.path)
        checks = result["checks"]
        report = _report(folder, source, family.name, result["graphs"], checks)
        failed = [c for c in checks if not c["passed"]]
        if failed:
            raise VerificationError(f"the ONNX graphs differ from PyTorch: {failed[0]['name']} "
                                    f"{failed[0]['value']:.3g} > gate {failed[0]['gate']:.3g}; nothing was written",
                                    path=folder)
        return target.commit(report)


def verify_graphs(folder) -> list[dict]:
    """``ofaconv verify`` of an exported folder (its manifest already checked): every graph the
    report lists loads in onnxruntime, and the parity rows measured at export passed."""
    folder = Path(folder)
    _require_onnx()
    report = load_report(folder)
    rows = []
    for name in sorted(report.get("graphs") or {}):
        try:
            inference_session(folder / name, threads=1)
            rows.append({"name": f"graph {name}", "passed": True, "detail": "loads in onnxruntime"})
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a bad graph
            rows.append({"name": f"graph {name}", "passed": False, "detail": " ".join(str(exc).split())[:200]})
    if not rows:
        rows.append({"name": "graphs", "passed": False, "detail": f"{REPORT_NAME} lists no graphs"})
    recorded = report.get("checks") or []
    failed = [c.get("name") for c in recorded if not c.get("passed")]
    rows.append({"name": "export parity", "passed": bool(recorded) and not failed,
                 "detail": f"failed at export: {', '.join(map(str, failed))}" if failed else
                 f"{len(recorded)} rows measured against PyTorch at export"})
    return rows


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise OfaconvError(f"ONNX export needs {exc.name}: pip install 'ofaconv[onnx]'") from None


def _copy_side_files(folder: Path, out: Path) -> None:
    """The folder's configuration, tokenizer and processor files: what a runtime needs beside the graphs."""
    for path in sorted(folder.iterdir()):
        if path.name != REPORT_NAME and path.suffix in (".json", ".txt") and path.is_file() and not path.is_symlink():
            shutil.copyfile(path, out / path.name)


def _report(folder: Path, source: dict, family: str, graphs: dict, checks: list[dict]) -> dict:
    import onnx
    import onnxruntime
    import platform
    import torch

    from .. import __version__
    from .digest import file_sha256

    kept = {k: v for k, v in source.items() if k not in _OWN_KEYS}
    return {
        **kept,
        "schema": SCHEMA,
        "kind": "conversion",
        "format": "onnx",
        "model_family": family,
        "ofaconv_version": __version__,
        "source": source.get("source"),  # what the folder was converted from
        "exported_from": {"folder": str(folder.resolve()), "report_sha256": file_sha256(folder / REPORT_NAME)},
        "opset": OPSET,
        "graphs": graphs,
        "checks": checks,
        "passed": all(c["passed"] for c in checks),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "python": platform.python_version()},
    }


# -- ONNX files -------------------------------------------------------------------------------------
def _load(path: Path):
    import onnx

    return onnx.load(str(path))  # with its external data, if the exporter wrote any


def _save(model, path: Path) -> None:
    import onnx

    large = model.ByteSize() > _PROTOBUF_LIMIT
    onnx.save(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
              location=f"{path.name}.data")


def _repaired(model):
    """Rewrite what the TorchScript exporter writes but onnxruntime cannot run: ``Where`` on
    booleans (a masked assignment ``x[mask] = True``) has no onnxruntime kernel, and its mask keeps
    the rank of the indexed dimensions only. Such a node becomes ``Where`` on uint8 with the mask
    unsqueezed to the data's rank (trailing axes, the dimensions the mask did not index)."""
    import onnx
    from onnx import TensorProto, helper

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type for v in (*inferred.graph.value_info, *inferred.graph.input)}

    def rank(name):
        t = types.get(name)
        return len(t.shape.dim) if t is not None and t.HasField("shape") else None

    nodes = []
    for node in model.graph.node:
        out = types.get(node.output[0]) if node.op_type == "Where" else None
        if out is None or out.elem_type != TensorProto.BOOL:
            nodes.append(node)
            continue
        cond, x, y = node.input
        name = node.output[0]
        missing = max(rank(x) or 0, rank(y) or 0) - (rank(cond) or 0)
        if rank(cond) is not None and missing > 0:
            axes = helper.make_tensor(f"{name}/mask_axes", TensorProto.INT64, [missing],
                                      list(range(rank(cond), rank(cond) + missing)))
            model.graph.initializer.append(axes)
            nodes.append(helper.make_node("Unsqueeze", [cond, axes.name], [f"{name}/mask"]))
            cond = f"{name}/mask"
        nodes += [
            helper.make_node("Cast", [x], [f"{name}/x"], to=TensorProto.UINT8),
            helper.make_node("Cast", [y], [f"{name}/y"], to=TensorProto.UINT8),
            helper.make_node("Where", [cond, f"{name}/x", f"{name}/y"], [f"{name}/u8"]),
            helper.make_node("Cast", [f"{name}/u8"], [name], to=TensorProto.BOOL),
        ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


# -- CLI --------------------------------------------------------------------------------------------
def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a converted folder for another runtime (onnx)")
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    onnx = formats.add_parser(
        "onnx", help="ONNX graphs for onnxruntime, checked against PyTorch (docs/deployment.md)",
        description="Write FOLDER (an OFA or CLIP folder ofaconv wrote) as ONNX graphs into OUT: OFA "
                    "encoder.onnx + decoder.onnx (with past keys/values), CLIP vision.onnx + text.onnx. "
                    "Every graph is compared with PyTorch at batch 1 and 3 (max abs diff <= 1e-4; OFA: "
                    "captions token for token at beam 1 and 5) and the results go into OUT's "
                    f"{REPORT_NAME}.")
    onnx.add_argument("folder", type=Path, help="converted model folder")
    onnx.add_argument("out", type=Path, help="output folder (must not exist, or be empty, or --force)")
    onnx.add_argument("--force", action="store_true", help="replace OUT if it is an earlier ofaconv output")
    onnx.add_argument("--threads", type=int, default=None, help="onnxruntime threads for the checks (default: all cores)")
    onnx.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from .verify import format_checks

    report = export_onnx(args.folder, args.out, force=args.force, threads=args.threads)
    for line in format_checks(report["checks"]):
        print(line)
    print(f"wrote {', '.join(report['graphs'])} to {os.fspath(args.out)}", file=sys.stderr)
    return 0
