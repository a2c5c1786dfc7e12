"""Run a zoo: decide what is out of date, build it in worker processes, write lock and report.

    models needed by this shard -> prepare (tiny build, fingerprint, reference)
        -> per output: key unchanged and file present? skip : build (+ measure)
    -> zoo.lock.json after every finished job -> report.json / report.md

Each job runs in its own process (a crash or an out-of-memory kill takes
one job down, not the zoo), started from a fork server so that starting one
costs milliseconds. Jobs start while both `--jobs` and the memory budget
allow; the first job always starts, even when its estimate alone is larger
than the budget.

The lock file is rewritten atomically after each job, so a run killed at
any moment leaves a lock that describes exactly the outputs that are
complete under their names; the next run does the rest.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Iterator

from smolq.atomic import atomic_output, remove_stale_parts
from smolq.errors import InputError
from smolq.progress import stderr_console
from smolq.zoo import keys, report
from smolq.zoo.build import NeedsWork, prepare_model
from smolq.zoo.lock import load_json, save_json
from smolq.zoo.manifest import Manifest, OutputSpec
from smolq.zoo.worker import run_job

LOCK_NAME = "zoo.lock.json"
CACHE_DIR = ".zoo"
MiB = 1 << 20
BASE_JOB_BYTES = 384 * MiB  # an interpreter with numpy and smolq loaded
TORCH_JOB_BYTES = 1536 * MiB  # ... with torch and transformers (tiny models, GPTQ)


@dataclass
class RunOptions:
    jobs: int = 1
    shard: tuple[int, int] | None = None
    fail_fast: bool = False
    quiet: bool = False
    max_memory: int | None = None  # bytes; None: what the machine has available now
    verify_outputs: bool = False  # re-checksum up-to-date outputs (not just their sizes) before skipping


@dataclass
class Job:
    kind: str  # "prepare" | "output"
    label: str
    request: dict[str, Any]
    memory: int
    output: OutputSpec | None = None
    process: Any = None
    conn: Any = None
    started: float = 0.0
    task: Any = None


@dataclass
class RunState:
    manifest: Manifest
    out: Path
    lock: dict[str, Any]
    stat_cache: dict[str, Any]
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # prepare results
    status: dict[str, dict[str, Any]] = field(default_factory=dict)  # output id -> {status, error, ...}
    stop: bool = False


# --------------------------------------------------------------------------- memory

def available_memory() -> int:
    """MemAvailable from /proc/meminfo (Linux); otherwise physical memory."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fits(running: list[int], estimate: int, budget: int) -> bool:
    """May a job of `estimate` bytes start beside `running` ones? The first always may."""
    return not running or sum(running) + estimate <= budget


def estimate_prepare(model: Any, eval_on: bool) -> int:
    """Tiny models are built with torch; perplexity (torch too) holds the reference in float32."""
    if model.tiny is not None:
        return TORCH_JOB_BYTES
    size = keys.tree_bytes(model.source) if model.source.exists() else 0
    return TORCH_JOB_BYTES + 4 * size if eval_on else BASE_JOB_BYTES + size


def estimate_output(spec: OutputSpec, fp: dict[str, Any], eval_on: bool) -> int:
    """Streaming RTN holds a few copies of the largest tensor; GPTQ and perplexity hold the model."""
    if spec.method == "gptq":
        return TORCH_JOB_BYTES + 2 * fp["f32_bytes"]
    if eval_on:
        return TORCH_JOB_BYTES + max(4 * fp["largest_f32_bytes"], 2 * fp["f32_bytes"])
    return BASE_JOB_BYTES + 4 * fp["largest_f32_bytes"]


# --------------------------------------------------------------------------- the run

def run_zoo(manifest: Manifest, opts: RunOptions) -> dict[str, Any]:
    """Build what is out of date for this shard; returns the report (also written to disk)."""
    out = manifest.out
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        _remove_partial_files(out)
        state = RunState(manifest, out, _load_lock(out, manifest), load_json(out / CACHE_DIR / "stat-cache.json", {}))
        selected = select_outputs(manifest, opts.shard)
        needed = [m for m in manifest.models if any(o.model == m.name for o in selected)]
        with ZooProgress(len(selected), opts.quiet) as progress:
            _Scheduler(state, opts, selected, needed, progress).run()
        _save_lock(state)
        save_json(out / CACHE_DIR / "stat-cache.json", state.stat_cache)
        rows = [report.make_row(o, state.lock["outputs"].get(o.id), state.status.get(o.id, {}),
                                state.models.get(o.model)) for o in selected]
        models = [report.model_info(m, state.models.get(m.name)) for m in needed]
        result = report.build_report(report.plan_of(manifest), rows, models,
                                     shard=f"{opts.shard[0]}/{opts.shard[1]}" if opts.shard else None)
        report.write_report(result, out)
    return result


def select_outputs(manifest: Manifest, shard: tuple[int, int] | None) -> list[OutputSpec]:
    if shard is None:
        return manifest.outputs
    k, n = shard
    return [o for o in manifest.outputs if keys.shard_of(o.id, n) == k]


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One zoo run per output directory at a time (a second one would race on the lock file)."""
    import fcntl

    (out / CACHE_DIR).mkdir(parents=True, exist_ok=True)
    with open(out / CACHE_DIR / "run.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(out, "another smolq zoo run is using this output directory") from None
        yield


def _remove_partial_files(out: Path) -> None:
    """Temporary parts of a killed run (atomic_output's ".NAME.XXXX.part"), anywhere under `out`."""
    remove_stale_parts(out, recursive=True)


def _load_lock(out: Path, manifest: Manifest) -> dict[str, Any]:
    lock = load_json(out / LOCK_NAME, {})
    if lock.get("schema") != keys.ZOO_SCHEMA:
        lock = {}
    known = {o.id for o in manifest.outputs}
    return {
        "schema": keys.ZOO_SCHEMA,
        "versions": keys.versions(),
        "models": {k: v for k, v in (lock.get("models") or {}).items() if k in {m.name for m in manifest.models}},
        "outputs": {k: v for k, v in (lock.get("outputs") or {}).items() if k in known},
    }


def _save_lock(state: RunState) -> None:
    lock = state.lock
    lock["models"] = dict(sorted(lock["models"].items()))
    lock["outputs"] = dict(sorted(lock["outputs"].items()))
    save_json(state.out / LOCK_NAME, lock)


# --------------------------------------------------------------------------- scheduling

class _Scheduler:
    def __init__(self, state: RunState, opts: RunOptions, selected: list[OutputSpec], needed: list[Any],
                 progress: "ZooProgress"):
        self.state, self.opts, self.progress = state, opts, progress
        self.selected = selected
        self.eval = _eval_request(state.manifest, state.out)
        self.pending: list[Job] = []
        self.running: list[Job] = []
        self.budget = opts.max_memory or int(available_memory() * 0.9)
        self.ctx = _mp_context()
        for model in needed:
            self._prepare(model)

    # -- planning

    def _prepare_request(self, model: Any) -> dict[str, Any]:
        return {"model": model.name, "source": str(model.source) if model.source else None, "tiny": model.tiny,
                "cache_dir": str(self.state.out / CACHE_DIR), "reference": self.state.manifest.reference,
                "eval": self.eval, "stat_cache": self.state.stat_cache,
                "previous": self.state.lock["models"].get(model.name) or {}}

    def _prepare(self, model: Any) -> None:
        req = self._prepare_request(model)
        try:
            result = prepare_model(req, dry=True)
        except NeedsWork:
            req["stat_cache"] = {k: v for k, v in self.state.stat_cache.items() if k == str(model.source)}
            self.pending.append(Job("prepare", f"{model.name} (prepare)", req,
                                    estimate_prepare(model, self.eval is not None)))
            return
        self._prepared(model.name, result)

    def _prepared(self, name: str, result: dict[str, Any]) -> None:
        self.state.models[name] = result
        if result.get("stat_entry"):
            self.state.stat_cache[result["source_path"]] = result["stat_entry"]
        ref = result.get("reference")
        self.state.lock["models"][name] = {
            "source": result["fingerprint"],
            "reference": None if ref is None else {k: v for k, v in ref.items() if k != "path"},
        }
        for spec in self.selected:
            if spec.model == name:
                self._plan_output(spec, result)

    def _plan_output(self, spec: OutputSpec, model: dict[str, Any]) -> None:
        if spec.calibration is not None and not spec.calibration.is_file():
            self._output_failed(spec, {"message": f"{spec.calibration}: calibration file does not exist"})
            return
        calib = keys.file_checksum(spec.calibration) if spec.calibration else None
        build_key = keys.output_key(model["fingerprint"]["digest"], spec.options(), calib)
        ref = model.get("reference")
        mkey = keys.metrics_key(build_key, ref["digest"] if ref else None, self.eval["digest"] if self.eval else None)
        entry = self.state.lock["outputs"].get(spec.id)
        path = self.state.out / spec.relpath
        fresh = (entry is not None and entry.get("key") == build_key and entry.get("path") == spec.relpath
                 and path.exists() and keys.tree_bytes(path) == entry.get("bytes")
                 and (not self.opts.verify_outputs or keys.tree_checksum(path) == entry.get("files")))
        if fresh and entry.get("metrics_key") == mkey:
            self.state.status[spec.id] = {"status": "skipped"}
            self.progress.finished(spec.id, "skipped")
            return
        req = {"id": spec.id, "output": spec.options(), "calibration": str(spec.calibration) if spec.calibration else None,
               "source_path": model["source_path"], "source_kind": model["source_kind"], "out_path": str(path),
               "metrics_only": fresh, "reference": ref, "eval": self.eval,
               "key": build_key, "metrics_key": mkey, "relpath": spec.relpath}
        if not fresh:
            self.state.lock["outputs"].pop(spec.id, None)  # stale until rebuilt
        self.pending.append(Job("output", spec.id, req, estimate_output(spec, model["fingerprint"], self.eval is not None),
                                output=spec))

    # -- running

    def run(self) -> None:
        try:
            while (self.pending and not self.state.stop) or self.running:
                self._start_what_fits()
                self._wait_once()
        finally:
            for job in self.running:
                _kill(job)
            self.running.clear()
        for job in self.pending:  # --fail-fast stopped these
            self._not_run(job)

    def _start_what_fits(self) -> None:
        while self.pending and not self.state.stop and len(self.running) < max(self.opts.jobs, 1):
            job = self.pending[0]
            if not fits([j.memory for j in self.running], job.memory, self.budget):
                return
            self.pending.pop(0)
            self._start(job)

    def _start(self, job: Job) -> None:

        job.request["log"] = str(self.state.out / _log_relpath(job.label))
        parent, child = self.ctx.Pipe(duplex=False)
        threads = max(1, (os.cpu_count() or 1) // max(self.opts.jobs, 1))
        job.process = self.ctx.Process(target=run_job, args=(job.kind, job.request, child, threads), daemon=True)
        job.process.start()
        child.close()
        job.conn, job.started = parent, time.perf_counter()
        job.task = self.progress.job_started(job.label)
        self.running.append(job)

    def _wait_once(self) -> None:
        if not self.running:
            return
        handles = {j.conn: j for j in self.running}
        for ready in wait(list(handles), timeout=1.0):
            job = handles[ready]
            try:
                kind, payload = ready.recv()
            except EOFError:
                self._finish(job, None, {"message": _death_message(job), "traceback": None})
                continue
            if kind == "event":
                self.progress.job_event(job.task, payload)
            elif kind == "done":
                self._finish(job, payload, None)
            else:
                self._finish(job, None, payload)

    def _finish(self, job: Job, result: dict[str, Any] | None, error: dict[str, Any] | None) -> None:
        job.conn.close()
        job.process.join(timeout=30)
        self.running.remove(job)
        self.progress.job_finished(job.task)
        if job.kind == "prepare":
            if error is None:
                self._prepared(job.request["model"], result)
            else:
                self._model_failed(job.request["model"], {**error, "message": f"{error['message']} "
                                                                              f"(log: {_log_relpath(job.label)})"})
            return
        if error is None:
            self._output_done(job, result)
        else:
            self._output_failed(job.output, error, _log_relpath(job.label))

    def _output_done(self, job: Job, result: dict[str, Any]) -> None:
        req = job.request
        old = self.state.lock["outputs"].get(req["id"], {})
        timing = dict(old.get("timing") or {})
        timing.update({k: result[k] for k in ("build_s", "metrics_s") if k in result})
        self.state.lock["outputs"][req["id"]] = {
            "path": req["relpath"], "key": req["key"], "metrics_key": req["metrics_key"],
            "options": req["output"], "bytes": result["bytes"], "files": result["files"],
            "notes": result.get("notes", old.get("notes", [])), "metrics": result["metrics"], "timing": timing,
        }
        _save_lock(self.state)
        status = "measured" if req["metrics_only"] else "built"
        self.state.status[req["id"]] = {"status": status}
        self.progress.finished(req["id"], status, time.perf_counter() - job.started)
        if self.opts.fail_fast and report.failed_gates(job.output, self.state.lock["outputs"][req["id"]],
                                                       self.state.models.get(job.output.model)):
            self.state.stop = True

    def _output_failed(self, spec: OutputSpec, error: dict[str, Any], log: str | None = None) -> None:
        message = error["message"] + (f" (log: {log})" if log else "")
        self.state.status[spec.id] = {"status": "failed", "error": message,
                                      "traceback": error.get("traceback")}
        self.progress.finished(spec.id, "failed", detail=error["message"])
        if self.opts.fail_fast:
            self.state.stop = True

    def _model_failed(self, name: str, error: dict[str, Any]) -> None:
        for spec in self.selected:
            if spec.model == name:
                self._output_failed(spec, {**error, "message": f"preparing model {name}: {error['message']}"})

    def _not_run(self, job: Job) -> None:
        specs = [job.output] if job.output else [s for s in self.selected if s.model == job.request["model"]]
        for spec in specs:
            self.state.status[spec.id] = {"status": "not run", "error": "stopped by --fail-fast"}


def _log_relpath(label: str) -> str:
    """A job's log file, relative to the output directory."""
    import re

    return f"{CACHE_DIR}/logs/{re.sub(r'[^A-Za-z0-9._+-]+', '-', label).strip('-')}.log"


def _eval_request(manifest: Manifest, out: Path) -> dict[str, Any] | None:
    """The evaluation text as a file under the cache (`smolq eval` reads files), named by its digest."""
    ev = manifest.eval
    if ev is None:
        return None
    path = out / CACHE_DIR / "eval" / f"{ev.digest[:16]}.txt"
    if not path.is_file():

        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as fh:
            fh.write(ev.text.encode("utf-8"))
    return {"path": str(path), "ctx": ev.ctx, "digest": ev.digest}


def _mp_context() -> Any:
    """A fork server (cheap starts, no threads inherited from the progress display) where there is one."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["smolq.zoo.worker"])  # not numpy: workers set thread limits first
        return ctx
    return multiprocessing.get_context("spawn")


def _kill(job: Job) -> None:
    with contextlib.suppress(Exception):
        job.process.kill()
        job.process.join(timeout=10)


def _death_message(job: Job) -> str:
    job.process.join(timeout=10)
    code = job.process.exitcode
    if code is not None and code < 0:
        import signal

        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"worker process was killed by {name}{hint}"
    return f"worker process exited with code {code} without a result"


# --------------------------------------------------------------------------- progress

class ZooProgress:
    """One rich display: a bar for the whole zoo and a line per running job."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.quiet = total, quiet
        self._progress = None
        self._overall = None

    def __enter__(self) -> "ZooProgress":
        if not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


            self._progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("{task.fields[detail]}"),
                                      console=stderr_console(), transient=False)
            self._progress.__enter__()
            self._overall = self._progress.add_task("[bold]zoo", total=max(self.total, 1), detail="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def job_started(self, label: str) -> Any:
        if self._progress is None:
            return None
        return self._progress.add_task(f"  {label}", total=None, detail="starting")

    def job_event(self, task: Any, event: dict[str, Any]) -> None:
        if self._progress is None or task is None:
            return
        kind = event.get("event")
        if kind == "start":
            self._progress.update(task, total=max(int(event.get("n_tensors", 0)), 1), completed=0)
        elif kind == "tensor":
            self._progress.update(task, advance=1, detail=str(event.get("name", "")))
        elif kind == "phase":
            self._progress.update(task, detail=str(event.get("phase", "")))

    def job_finished(self, task: Any) -> None:
        if self._progress is not None and task is not None:
            self._progress.remove_task(task)

    def finished(self, output_id: str, status: str, seconds: float | None = None, detail: str = "") -> None:
        if self._progress is None:
            return
        self._progress.advance(self._overall, 1)
        took = f" in {seconds:.1f} s" if seconds is not None else ""
        extra = f": {detail}" if detail else ""
        self._progress.console.print(f"{status:>8} {output_id}{took}{extra}", markup=False, highlight=False)
