"""Today's Check as it was before the money path: the server at BASELINE_COMMIT.

Rows 9 and 10 measure the money path against the code it replaced, in the same run. The
old tree comes out of this repository's own history (`git archive`); its proto only
lacked fields, so the stubs generated from today's proto serve it too. It runs with its
directory first on PYTHONPATH: the project's editable install puts its import hook at the
end of sys.meta_path, so an entry on sys.path wins over it. `verify_server` proves it
did, from what the running server loaded into its Redis.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import redis as redis_sync

from devstack import processes as p
from keys import keyspace
from keys.scripts import CHECK, Script

BASELINE_COMMIT = "abfe7b6"  # the last commit before the money path
_GENERATED = ("keys_pb2.py", "keys_pb2.pyi", "keys_pb2_grpc.py", "keys_pb2_grpc.pyi", "keys.pb")


def _git(*args: str) -> bytes:
    done = subprocess.run(
        ["git", "-C", str(p.ROOT), *args], capture_output=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"git {' '.join(args)} failed: {done.stderr.decode(errors='replace').strip()} "
            f"(rows 9 and 10 need this repository's history, commit {BASELINE_COMMIT})"
        )
    return done.stdout


def lua(name: str) -> str:
    """A script's text at BASELINE_COMMIT."""
    return _git("show", f"{BASELINE_COMMIT}:keys/lua/{name}.lua").decode()


def check_script() -> Script:
    """check.lua at BASELINE_COMMIT as its server loaded it (_lib.lua prepended).
    ARGV: digest, now ms, body model kind, model, window ms, next month ms; KEYS: the record."""
    return Script("check-baseline", lua("_lib") + lua("check"))


def build_tree(directory: Path) -> Path:
    """The baseline's source in `directory`, with today's generated stubs copied in."""
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(_git("archive", BASELINE_COMMIT)), mode="r:") as tar:
        tar.extractall(directory, filter="data")
    for name in _GENERATED:
        shutil.copy2(p.ROOT / "keys" / "v1" / name, directory / "keys" / "v1" / name)
    return directory


def tree_in(root: Path) -> Path:
    """`root`/baseline, built once per run (rows 9 and 10 both run it)."""
    directory = root / "baseline"
    if not (directory / "extauthz" / "__init__.py").exists():
        build_tree(directory)
    return directory


def python_path(tree: Path) -> dict[str, str]:
    """The environment entry that puts the tree first on the server's import path."""
    rest = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": str(tree) + (os.pathsep + rest if rest else "")}


def verify_imports(tree: Path) -> dict[str, str]:
    """Where `extauthz` and `keys` import from under that environment (from a neutral
    working directory, as the `extauthz` console script sees it). Raises unless both are
    the tree's."""
    code = "import extauthz, keys; print(extauthz.__file__); print(keys.__file__)"
    env = {**os.environ, **python_path(tree)}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=tree.parent,
        timeout=60,
        check=True,
    )
    extauthz_file, keys_file = done.stdout.split()
    for path in (extauthz_file, keys_file):
        if not Path(path).resolve().is_relative_to(tree.resolve()):
            raise RuntimeError(f"the baseline imports {path}, not the tree in {tree}")
    return {"extauthz": extauthz_file, "keys": keys_file}


def verify_server(redis_url: str, key_id: str) -> None:
    """The server on `redis_url` is the baseline: it loaded the old check.lua (and not
    today's) at start, and an allowed Check of `key_id` opened no in-flight record."""
    client = redis_sync.Redis.from_url(redis_url)
    try:
        old, new = client.script_exists(check_script().sha, CHECK.sha)
        inflight = client.exists(keyspace.inflight_key(key_id))
        counted = int(client.hget(keyspace.record_key(key_id), "total_requests") or 0)
    finally:
        client.close()
    if not old or new or inflight or counted < 1:
        raise RuntimeError(
            f"the baseline server is not running {BASELINE_COMMIT}'s code: old check.lua "
            f"loaded {old}, today's {new}, in-flight set {inflight}, Checks counted {counted}"
        )
