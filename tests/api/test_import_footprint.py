"""The API process loads no gRPC, torch or vLLM module: its image does not carry them, and
importing them would only cost memory and start-up time."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("grpc", "torch", "vllm", "smallfirst.common.pb")

PROGRAM = """
import json, sys
from smallfirst.api.app import create_app
from smallfirst.api.settings import ApiSettings
create_app(ApiSettings.model_validate({"redis_url": "redis://127.0.0.1:1/0", "catalog_path": sys.argv[1]}))
print(json.dumps(sorted(sys.modules)))
"""


def test_creating_the_api_app_imports_no_grpc_torch_or_vllm_module(catalog_path: object) -> None:
    # when: a fresh interpreter builds the app (no server started, nothing connects)
    result = subprocess.run([sys.executable, "-c", PROGRAM, str(catalog_path)], capture_output=True, text=True,
                            timeout=120, check=False)

    # then
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert "smallfirst.api.app" in modules
    loaded = [m for m in modules if any(m == name or m.startswith(f"{name}.") for name in FORBIDDEN)]
    assert loaded == []
