"""The one local build hook: generated code is built, never committed.

Two things in uffdd are produced at build time rather than written by hand: the cffi
extension ``uffdd.native._ffi`` (the C of ``uffdd/native/csrc/``, compiled against this
machine's kernel and xxHash headers by ``uffdd/native/build.py``) and the protobuf/gRPC
modules generated from ``proto/``. Both land inside the source tree (so editable installs work)
and are declared as wheel artifacts (so ``pip install .`` ships them even though
``.gitignore`` hides them from version control).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

PROTO_ROOT = "proto"
GENERATED_PACKAGE = Path("uffdd") / "v1"
FFI_BUILDER = Path("uffdd") / "native" / "build.py"


def _plugin(name: str) -> str:
    """Locate a protoc plugin installed beside this interpreter (build env) or on PATH."""
    script_dir = Path(sysconfig.get_path("scripts"))
    for candidate in (script_dir / name, Path(sys.executable).parent / name):
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"protoc plugin {name} not found; is mypy-protobuf installed?")
    return found


def generate_protos(root: Path) -> list[Path]:
    """Run protoc on every .proto under proto/; return the files it wrote."""
    from grpc_tools import protoc  # only present in the build environment

    protos = sorted((root / PROTO_ROOT).rglob("*.proto"))
    out_dir = root / GENERATED_PACKAGE
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    if protos:
        well_known = Path(protoc.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{root / PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={root}",
            f"--grpc_python_out={root}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--mypy_out={root}",
            f"--mypy_grpc_out={root}",
            *(str(p) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(map(str, protos))}")
    for package_dir in [out_dir, *(p for p in out_dir.rglob("*") if p.is_dir())]:
        (package_dir / "__init__.py").touch()
        (package_dir / "py.typed").touch()
    return sorted(p for p in out_dir.rglob("*") if p.is_file())


def compile_ffi(root: Path) -> Path:
    """Compile the cffi extension in a scratch dir and place it beside its package."""
    spec = importlib.util.spec_from_file_location("_uffdd_ffi_build", root / FFI_BUILDER)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {FFI_BUILDER}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    target_dir = root / "uffdd" / "native"
    for stale in target_dir.glob("_ffi*.so"):
        stale.unlink()
    with tempfile.TemporaryDirectory(prefix="uffdd-ffi-") as scratch:
        built = Path(module.make_builder().compile(tmpdir=scratch, verbose=False))
        destination = target_dir / built.name
        shutil.copy2(built, destination)
    return destination


class UffddBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        generated = [*generate_protos(root), compile_ffi(root)]
        build_data["artifacts"].extend(str(p.relative_to(root)) for p in generated)
        # The wheel carries a compiled extension: tag it for this interpreter/platform.
        build_data["pure_python"] = False
        build_data["infer_tag"] = True


if __name__ == "__main__":
    # Developer shortcut: `python hatch_build.py [protos|ffi]` regenerates in place
    # without reinstalling (what the hook does during `pip install -e .`).
    _root = Path(__file__).resolve().parent
    _parts = sys.argv[1:] or ["protos", "ffi"]
    if "protos" in _parts:
        print("\n".join(str(p) for p in generate_protos(_root)))
    if "ffi" in _parts:
        print(compile_ffi(_root))
