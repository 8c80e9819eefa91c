"""Running the project's command-line tools as a user would, in a subprocess."""
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tool_env(**extra) -> dict:
    return dict(os.environ, PYTHONWARNINGS='ignore', PYTHONUNBUFFERED='1', **extra)


def run_tool(args, cwd, **env) -> str:
    """Runs ``python ARGS`` in ``cwd``; fails the test with the output's tail unless it exits 0."""
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=tool_env(**env), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def free_port() -> int:
    """A TCP port on loopback that nothing listens on, for a rendezvous."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]
