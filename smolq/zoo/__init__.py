"""smolq zoo: requantize a model zoo from one manifest, incrementally, with gates and a report.

    manifest.py  the TOML manifest (models, outputs, gates), checked up front
    keys.py      what an output's bytes depend on (its key) and which shard builds it
    build.py     one job's work (prepare a model; build and measure an output)
    worker.py    the worker process entry point
    runner.py    scheduling (jobs, memory), lock file, progress display
    report.py    report.json / report.md, gates, merging shard reports
"""
from smolq.zoo.manifest import Manifest, load_manifest  # noqa: F401
from smolq.zoo.report import merge_reports  # noqa: F401
from smolq.zoo.runner import RunOptions, run_zoo  # noqa: F401
