"""schemathesis, a property-based API fuzzer, against the API's own OpenAPI schema."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import DeploymentFactory

SCHEMATHESIS = shutil.which("schemathesis") or str(Path(__file__).parents[2] / ".venv" / "bin" / "schemathesis")
# What must hold for every generated request: no 5xx, and every response as the schema says.
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


@pytest.mark.timeout(600)
async def test_fuzzing_finds_no_server_error_and_no_schema_violation(deploy: DeploymentFactory, tmp_path: Path) -> None:
    d = await deploy({"api": {"max_body": 65536}}, senders={})
    command = [
        SCHEMATHESIS,
        "run",
        f"{d.api_url}/openapi.json",
        "--checks",
        CHECKS,
        "--max-examples",
        "30",
        "--phases",
        "examples,coverage,fuzzing",
        "--seed",
        "20261202",
        "--no-color",
        "--report-dir",
        str(tmp_path),
    ]
    # Run in tmp_path: schemathesis keeps its cache in .schemathesis/ under the working directory.
    # The hooks module is found through PYTHONPATH instead.
    root = str(Path(__file__).parents[2])
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.integration.schemathesis_hooks", "PYTHONPATH": pythonpath}
    result = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=540, env=env, cwd=tmp_path
    )
    summary = result.stdout[-3000:]
    print(summary)
    assert result.returncode == 0, summary
    assert "No issues found" in result.stdout or " passed" in result.stdout, summary
