"""README command 1 stopped halfway, then run again, as a user would: a fresh clone of this checkout (its
`.venv` linked, its own code), no ILR_* variables; at a point of the first run, a signal; then the same
command again. Prints when the signal went, how the first run ended, how the re-run ended and how long it
took, and the temporary Prefect servers running after each step (each one a process of about 200 MB).

    .venv/bin/python benchmarks/stop_probe.py MARKER DELAY SIGNAL
      MARKER  text of the first run's output to wait for ("1. dataset": the search starts after it), or
              proc:REGEX, a process command line to wait for ("proc:[-]m dvc add")
      DELAY   seconds to wait after it
      SIGNAL  INT (Ctrl-C: to the process group, as a terminal sends it), TERM (`kill PID`: to the command
              alone), KILL (to the command alone, as the out-of-memory killer does) or KILLGROUP

Commit first: the clone is of HEAD. Afterwards `ilr stop` runs in the clone and the background retrain of the
second dataset version is waited for. Run it on an otherwise idle machine: the first run takes 3-4 minutes.
"""
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(marker: str, delay: float, sig: str) -> None:
    clone = Path(tempfile.mkdtemp(prefix="ilr-stop-probe-")) / "ilr"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    (clone / ".venv").symlink_to(ROOT / ".venv")
    env = {"HOME": os.environ["HOME"], "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           "PYTHONPATH": str(clone)}
    servers = lambda: sum("prefect.server.api.server:create_app" in c for c in _cmdlines())  # noqa: E731

    def start(log: Path) -> subprocess.Popen:  # as a terminal runs a job: its own group, SIGINT by default
        return subprocess.Popen(["./scripts/demo"], cwd=clone, env=env, stdout=open(log, "w"),
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def seen(log: Path) -> bool:
        if marker.startswith("proc:"):
            return subprocess.run(["pgrep", "-f", marker[5:]], capture_output=True).returncode == 0
        return marker in log.read_text()

    first, again = clone.parent / "first.log", clone.parent / "again.log"
    print(f"clone {clone}; logs {first}, {again}", flush=True)
    t0 = time.time()
    p = start(first)
    while not seen(first):
        if p.poll() is not None:
            sys.exit(f"the first run ended (exit {p.returncode}) before {marker!r}")
        time.sleep(0.02 if marker.startswith("proc:") else 0.5)
    time.sleep(delay)
    print(f"SIG{sig} {time.time() - t0:.0f} s into the first run", flush=True)
    t1 = time.time()
    if sig == "INT":
        os.killpg(p.pid, signal.SIGINT)
    elif sig == "KILLGROUP":
        os.killpg(p.pid, signal.SIGKILL)
    else:
        os.kill(p.pid, getattr(signal, f"SIG{sig}"))
    rc = p.wait()
    print(f"first run: exit {rc}, {time.time() - t1:.0f} s after the signal", flush=True)
    time.sleep(3)
    print(f"temporary Prefect servers running: {servers()}", flush=True)
    t2 = time.time()
    rc = start(again).wait()
    print(f"run again: exit {rc} in {time.time() - t2:.0f} s", flush=True)
    ilr = [str(clone / ".venv" / "bin" / "ilr"), "stop"]
    subprocess.run(ilr, cwd=clone, env=env, capture_output=True)
    while _retrain_running():  # the background retrain of the second dataset version
        time.sleep(2)
    print("ilr stop:", subprocess.run(ilr, cwd=clone, env=env, capture_output=True, text=True).stdout.strip())
    print(f"temporary Prefect servers running at the end: {servers()}", flush=True)


def _cmdlines() -> list[list[str]]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0"))
        except OSError:
            continue
    return out


def _retrain_running() -> bool:
    return any(len(c) > 2 and c[1].endswith("/ilr") and c[2] == "retrain" for c in _cmdlines())


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(sys.argv[1], float(sys.argv[2]), sys.argv[3])
