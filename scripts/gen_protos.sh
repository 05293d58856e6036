#!/usr/bin/env bash
# Regenerate the Python code of the gRPC protos into services/common/smallfirst/common/pb/.
#
# The generated code lives in the shared package so the small worker, which has no torch and no
# vLLM, can call the inference service. Output is deterministic for the pinned grpcio-tools and
# mypy-protobuf (pyproject.toml, extra "dev"): CI runs this script and fails on any diff.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

if [[ -x .venv/bin/python ]]; then
  python=.venv/bin/python
else
  python=python3
fi
# protoc finds the mypy plugins on PATH; they sit next to the interpreter that has mypy-protobuf.
PATH="$(dirname "$("$python" -c 'import sys; print(sys.executable)')"):$PATH"
export PATH

proto_root=protos
out_root=services/common/smallfirst/common/pb
# The protos' package path (smallfirst/inference/v1) would collide with the smallfirst.inference
# service package, so the code goes under smallfirst.common.pb and its imports are rewritten.
protos=(smallfirst/inference/v1/inference.proto)

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

"$python" -m grpc_tools.protoc \
  --proto_path="$proto_root" \
  --python_out="$tmp" \
  --grpc_python_out="$tmp" \
  --mypy_out="$tmp" \
  --mypy_grpc_out="$tmp" \
  "${protos[@]}"

rm -rf "$out_root"
mkdir -p "$out_root"
cp -r "$tmp/smallfirst/." "$out_root/"

# Regular packages (not namespaces), so mypy and the wheel see them.
printf '"""Generated gRPC and protobuf code (scripts/gen_protos.sh). Do not edit."""\n' > "$out_root/__init__.py"
find "$out_root" -mindepth 1 -type d -print0 | while IFS= read -r -d '' dir; do
  touch "$dir/__init__.py"
done

# `from smallfirst.inference.v1 import x` -> `from smallfirst.common.pb.inference.v1 import x`,
# and the same for dotted references in the stubs.
find "$out_root" -type f \( -name '*.py' -o -name '*.pyi' \) -print0 | sort -z | while IFS= read -r -d '' file; do
  sed -i -E \
    -e 's/^(from|import) smallfirst\.inference\./\1 smallfirst.common.pb.inference./' \
    -e 's/([^.A-Za-z_])smallfirst\.inference\.v1\.([A-Za-z_]+_pb2)/\1smallfirst.common.pb.inference.v1.\2/g' \
    "$file"
done
