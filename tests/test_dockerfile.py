"""The Dockerfile's own commands, run in a clean virtual environment (no Docker engine runs here).

The test reads the Dockerfile, lays out its COPY sources under a scratch root as the image would
(WORKDIR included), creates a fresh venv standing in for the base image's Python, runs every RUN
line with the Dockerfile's ARG and ENV values (``useradd`` excepted: it would change this
machine; its uid is checked in test_app_api.py), then starts the CMD on a free port and checks
the app serves the embedded toy model offline. So a dependency missing from requirements.txt, a
file the image does not COPY, or a CMD that does not start fails here.

The torch index is the one build argument changed: the image's default is PyTorch's CPU index,
which this sandbox cannot reach; here pip takes the same pinned wheels from the package registry.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], m[0]), value)


def test_parser_reads_args_env_and_continuations():
    steps = _instructions('FROM x\n# note\nARG A=1\nENV B=2 \\\n    C="three four"\nRUN a \\\n  && b\n')
    assert steps == [("FROM", "x"), ("ARG", "A=1"), ("ENV", 'B=2  C="three four"'), ("RUN", "a  && b")]


@pytest.mark.skipif(not (REPO / "weights" / "toy-scenes" / "model_index.json").exists(), reason="toy model not shipped")
def test_dockerfile_commands_build_a_venv_that_serves_the_app(tmp_path, free_port):
    steps = _instructions((REPO / "Dockerfile").read_text())
    assert steps[0][0] == "FROM" and steps[0][1].startswith("python:3.11")
    root = tmp_path / "image"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    env["TMPDIR"] = str(tmp_path)
    build_args = {"TORCH_INDEX": "https://pypi.org/simple"}
    workdir = root
    ran, cmd = [], None
    for word, args in steps[1:]:
        if word == "ARG":
            name, _, default = args.partition("=")
            env[name] = build_args.get(name, default)
        elif word == "ENV":
            for pair in shlex.split(args):
                name, _, value = pair.partition("=")
                env[name] = _expand(value, env)
        elif word == "WORKDIR":
            workdir = root / args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif word == "COPY":
            parts = [p for p in args.split() if not p.startswith("--")]
            *sources, dest = parts
            target = (root / dest.lstrip("/")) if dest.startswith("/") else workdir / dest
            for source in sources:
                src = REPO / source
                if src.is_dir():  # Docker copies a folder's contents into the destination
                    shutil.copytree(src, target, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.tmp"))
                else:
                    into = target / src.name if dest.endswith("/") else target
                    into.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, into)
        elif word == "RUN":
            if args.startswith("useradd"):
                continue
            command = args.replace("/tmp/", f"{tmp_path}/")
            done = subprocess.run(["bash", "-c", command], cwd=workdir, env=env, capture_output=True, text=True)
            assert done.returncode == 0, f"RUN {args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            ran.append(args)
        elif word == "CMD":
            cmd = [_expand(a, env) for a in json.loads(args)]
    assert ran and cmd, "the Dockerfile has no RUN or no CMD"
    assert (workdir / "app.py").exists() and (workdir / "weights" / "toy-scenes" / "model_index.json").exists()

    # The venv holds what requirements.txt pins, and nothing of the repository's own checkout.
    python = venv / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import torch, diffusers, gradio, ldm_scene; print(ldm_scene.__file__)"],
                           cwd=workdir, env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert str(workdir) in probe.stdout

    port = free_port()
    cmd = [str(python) if c == "python" else c for c in cmd]
    cmd[cmd.index("--port") + 1] = str(port)
    cmd[cmd.index("--host") + 1] = "127.0.0.1"
    server = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, page = time.monotonic() + 300, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/config", timeout=5)
                if page.status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        assert server.poll() is None, server.stdout.read()[-3000:]
        assert page is not None and page.status_code == 200
        text = page.text
        assert "toy-scenes" in text and "could not start its model" not in text
    finally:
        server.terminate()
        server.wait(timeout=30)
