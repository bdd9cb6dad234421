"""`ilr demo`: the whole lifecycle on the embedded dataset, through the Prefect flows."""
from __future__ import annotations

import time

from data.config import ilr_home


def run_demo(size: str, seed: int, port: int | None, trials: int | None, steps: int | None, second_version: bool,
             console) -> dict:
    from flows import lifecycle as lc
    from monitoring.config import monitor_config
    from serving.client import Client

    from serving import service
    from serving.config import serve_config

    if service.running() is None:  # found out now, not after the whole lifecycle (a re-run keeps its service)
        service.check_port_free(serve_config(**({"port": port} if port else {})),
                                hint="stop that program, or give the demo another port: --port N")
    name = f"synthetic-{size}"
    t0 = time.perf_counter()
    stamp = lambda: f"[{time.perf_counter() - t0:6.1f}s]"  # noqa: E731
    say = lambda msg: console.print(f"{stamp()} {msg}")  # noqa: E731
    say(f"workspace {ilr_home()}")
    from flows.prefect_server import stop_orphaned_temporary_servers

    if n := stop_orphaned_temporary_servers():  # a run that was killed (SIGKILL, out of memory) left them
        say(f"stopped {n} temporary Prefect server(s) that killed commands left running")

    from data.versioning import versions

    before = versions(name)
    if before:  # a re-run: keep the versions (and the live index) the first run made; nothing new to ingest
        v1 = {"ref": before[-1].ref, "unchanged": True}
        say(f"1. dataset {v1['ref']} already versioned ({len(before)} version(s)); nothing to ingest")
    else:
        v1 = lc.ingest_dataset("synthetic", size, name, seed=seed)
        say(f"1. dataset {v1['ref']}: generated, validated (GX), versioned (DVC)")
    # one lifecycle at a time per workspace: a retrain that the first run started in the background finishes
    # before this run tunes, gates and swaps (two gates promoting, or two builds swapping, at once would race)
    with lc.retrain_lock():
        tr = lc.train_and_register(v1["ref"], trials, steps)
        t, g = tr["tune"], tr["gate"]
        say(f"2. tuned {t['trials']} trials ({t['stopped_early']} stopped early by ASHA), challenger "
            f"v{t['challenger']}; gate: {'PROMOTED' if g['promoted'] else 'rejected'} ({g['reason']})")
        ix = lc.build_and_swap_index(v1["ref"])
        say(f"3. index {ix['collection']}: {ix['images']} images, ANN recall {ix['recall']:.3f}, live alias moved: "
            f"{ix['alias_moved']}")
    dep = lc.deploy(port)
    url = dep["url"]
    say(f"4. serving {url}: model {dep['model']}, index {dep['index']}")
    if port and not url.endswith(f":{port}"):  # a service of an earlier run keeps its port
        say(f"   (this workspace's service was running already, on that port: `ilr stop` first to serve on {port})")

    from data import manifest
    from data.config import NO_LABEL
    from data.versioning import dataset_dir

    folder = dataset_dir(v1["ref"])[1]
    df = manifest.read(folder)
    queries = df[(df["split"] == "query") & (df["label"] != NO_LABEL)].head(3)
    client = Client(url)
    for _, q in queries.iterrows():
        res = client.search(folder / q["path"], top_k=3)
        top = res["results"][0]
        say(f"   query {q['image_id']} (instance {q['label']}) -> {top['image_id']} [{top['label']}] "
            f"inliers {top['inliers']} in {res['timings_ms']['total_ms']:.0f} ms")
    mon = lc.monitor(url, trigger=True)
    say(f"5. canary: mAP@{monitor_config().k} {mon['map_at_k']:.3f}, recall@k {mon['recall_at_k']:.3f}, "
        f"top-1 {mon['top1']:.3f}, p50 {mon['p50_ms']:.0f} ms; ANN recall {mon['ann_recall']:.3f}; "
        f"drift MMD^2 {mon['drift']['mmd']:.4f}; quality drop: {mon['quality_drop']}")
    import httpx

    page = httpx.get(f"{url}/dashboard/", timeout=30)
    plots = page.text.count('class="plot"')
    say(f"6. dashboard {url}/dashboard/ (HTTP {page.status_code}, {plots} plots)")
    out = {"url": url, "dataset": v1["ref"], "monitor": mon, "gate": g, "index": ix}
    if second_version and len(before) >= 2:
        say(f"7. a second version of {name} is registered already: no new version, no retrain trigger")
    elif second_version:
        # the retrain it triggers is as small as this demo's own search (--trials/--steps)
        v2 = lc.ingest_dataset("synthetic", size, name, seed=seed + 1, trials=trials, steps=steps)
        trig = v2.get("trigger")
        if trig:
            say(f"7. new dataset version {v2['ref']}: retrain trigger fired -> {trig['how']}")
            if "log" in trig:
                say(f"   the retrain flow (tune -> gate -> index {v2['ref']}) runs in the background; log {trig['log']}; "
                    "the service switches to the new index when it is built (watch the dashboard)")
        else:
            say(f"7. dataset version {v2['ref']} unchanged: no retrain trigger (running the demo again is idempotent)")
        out["second"] = v2
    from shlex import quote

    home = ilr_home()
    console.rule("where to look")
    console.print(f"dashboard      {url}/dashboard/")
    console.print(f"API docs       {url}/docs     (service stays up; stop with: .venv/bin/ilr stop)")
    # commands to copy into a shell: quoted where the workspace's path needs it (a space in a folder name)
    image, store = f"image=@{folder / queries.iloc[0]['path']}", f"sqlite:///{home / 'mlflow.db'}"
    console.print(f"example        curl -F {quote(image)} -F top_k=5 {url}/v1/search")
    console.print("MLflow UI      MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow ui "  # no GenAI job runner
                  f"--backend-store-uri {quote(store)} --host 127.0.0.1 --port 5000")
    console.print(f"Prefect UI     .venv/bin/ilr flows serve   (then http://127.0.0.1:4200; the password is the line "
                  f"in {home / 'prefect-auth'})")
    console.print("Ray dashboard  http://127.0.0.1:8265")
    console.print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    return out
