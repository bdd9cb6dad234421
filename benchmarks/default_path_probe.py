"""Three things a new user does on the default path, against two revisions in the same run: a fresh clone of
each (this checkout's `.venv` linked, the clone's own code), no ILR_* variables, the embedded `tiny` dataset.

  port       another program listens on the service's port: `./scripts/demo --port P`, then
             `ilr serve --background --port P`. How long until each ends, its exit status, its last line.
  stop       `./scripts/demo` (its second dataset version starts a retrain in the background), then at
             once `ilr stop`: what it says, whether a retrain and a Milvus Lite server of the clone still
             run 60 s later; then the clone's background work is waited for and ended, and `./scripts/demo`
             runs again.
  subfolder  in that clone, `ilr model list` from its docs/ folder: does it see the demo's registry, and is
             a workspace made there?

    .venv/bin/python benchmarks/default_path_probe.py BEFORE AFTER [SCENARIO...]

BEFORE/AFTER are git revisions (commit first). Run it on an otherwise idle machine: about 15 minutes.
"""
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEARCH = ["--size", "tiny", "--trials", "2", "--steps", "2"]


def clone_of(rev: str) -> tuple[Path, dict]:
    dest = Path(tempfile.mkdtemp(prefix=f"ilr-probe-{rev[:8]}-")) / "ilr"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    subprocess.run(["git", "checkout", "-q", rev], cwd=dest, check=True)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    env = {"HOME": os.environ["HOME"], "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           "PYTHONPATH": str(dest)}
    return dest, env


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> tuple[int, float, str]:
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    return r.returncode, time.monotonic() - t0, r.stdout + r.stderr


def last_line(out: str) -> str:
    lines = [ln.strip() for ln in out.splitlines() if ln.strip() and not ln.strip().startswith(("─", "hint:"))]
    return lines[-1][:200] if lines else ""


def clone_processes(clone: Path) -> dict[str, int]:
    """This clone's `ilr retrain` and Milvus Lite server processes."""
    found = {"retrain": 0, "milvus": 0}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if not cwd.startswith(str(clone)):
            continue
        if len(cmd) > 2 and cmd[1].endswith("/ilr") and cmd[2] == "retrain":
            found["retrain"] += 1
        elif any(part.endswith("milvus-lite") for part in cmd[:2]):
            found["milvus"] += 1
    return found


def port(rev: str) -> None:
    clone, env = clone_of(rev)
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        p = str(other.getsockname()[1])
        for cmd in (["./scripts/demo", *SEARCH, "--port", p], [".venv/bin/ilr", "serve", "--background", "--port", p]):
            rc, s, out = run(cmd, clone, env)
            print(f"  {rev[:8]} port: {' '.join(cmd[:2])}: exit {rc} after {s:.0f} s: {last_line(out)}", flush=True)
    run([".venv/bin/ilr", "stop"], clone, env)


def stop_and_subfolder(rev: str, subfolder: bool) -> None:
    clone, env = clone_of(rev)
    rc, s, out = run(["./scripts/demo", *SEARCH], clone, env)
    print(f"  {rev[:8]} stop: demo exit {rc} in {s:.0f} s", flush=True)
    if subfolder:
        rc, s, out = run([str(clone / ".venv" / "bin" / "ilr"), "model", "list"], clone / "docs", env)
        print(f"  {rev[:8]} subfolder: `ilr model list` in docs/: exit {rc}, champion listed: {'champion' in out}, "
              f"docs/.ilr made: {(clone / 'docs' / '.ilr').exists()}", flush=True)
    rc, s, out = run([".venv/bin/ilr", "stop"], clone, env)
    said = re.sub(r"\s+", " ", out.strip())[:300]
    print(f"  {rev[:8]} stop: `ilr stop` exit {rc} in {s:.1f} s: {said}", flush=True)
    time.sleep(60)
    print(f"  {rev[:8]} stop: 60 s later, still running in the clone: {clone_processes(clone)}", flush=True)
    deadline = time.monotonic() + 600
    while clone_processes(clone)["retrain"] and time.monotonic() < deadline:
        time.sleep(2)
    after = clone_processes(clone)
    print(f"  {rev[:8]} stop: once no retrain runs: {after}", flush=True)
    run([".venv/bin/ilr", "stop"], clone, env)
    rc, s, out = run(["./scripts/demo", *SEARCH], clone, env)
    print(f"  {rev[:8]} stop: demo again: exit {rc} in {s:.0f} s: {last_line(out)}", flush=True)
    run([".venv/bin/ilr", "stop"], clone, env)
    while clone_processes(clone)["retrain"]:
        time.sleep(2)
    run([".venv/bin/ilr", "stop"], clone, env)


def main(before: str, after: str, scenarios: list[str]) -> None:
    scenarios = scenarios or ["port", "stop", "subfolder"]
    for rev in (before, after):
        rev = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        if "port" in scenarios:
            port(rev)
        if "stop" in scenarios or "subfolder" in scenarios:
            stop_and_subfolder(rev, "subfolder" in scenarios)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
