"""Settings of the flows and the CLI (params.yaml `demo`, `pipeline`), and the check of the whole params file."""
from __future__ import annotations

from dataclasses import dataclass

from data.config import DataConfig, SyntheticConfig, check_ranges, check_size, from_params, params_doc, params_path
from data.errors import IlrError


@dataclass
class DemoConfig:
    size: str = "small"                 # embedded dataset size: tiny | small | medium
    seed: int = 0
    trials: int = 2                     # Ray Tune trials
    steps: int = 10                     # training steps per trial

    def __post_init__(self):
        check_size("demo", self.size)
        check_ranges("demo", self, {"trials": 1, "steps": 1})


@dataclass
class PipelineConfig:
    dataset: str = "synthetic-small"    # what retrain, `dvc repro train` and the scheduled flows work on


def demo_config(**kw) -> DemoConfig:
    return from_params(DemoConfig, "demo", **kw)


def pipeline_config(**kw) -> PipelineConfig:
    return from_params(PipelineConfig, "pipeline", **kw)


def sections() -> dict[str, type]:
    """Every section of params.yaml and the typed settings it feeds."""
    from models.config import ExtractConfig, GateConfig, ModelConfig, RerankConfig, TrainConfig, TuneConfig
    from monitoring.config import MonitorConfig
    from serving.config import IndexConfig, ServeConfig

    return {"data": DataConfig, "synthetic": SyntheticConfig, "demo": DemoConfig, "pipeline": PipelineConfig,
            "model": ModelConfig, "train": TrainConfig, "extract": ExtractConfig, "rerank": RerankConfig,
            "gate": GateConfig, "tune": TuneConfig, "index": IndexConfig, "serve": ServeConfig,
            "monitoring": MonitorConfig}


def check_params() -> None:
    """Load every section once, so a typo or a stale key fails at start with its name, not silently later."""
    known = sections()
    unknown = sorted(set(params_doc()) - set(known))
    if unknown:
        raise IlrError(f"unknown section(s) {', '.join(unknown)}", where=str(params_path()),
                       hint=f"known: {', '.join(sorted(known))}")
    for name, cls in known.items():
        try:
            from_params(cls, name)
        except TypeError as e:
            raise IlrError(f"section {name!r}: {e}", where=str(params_path())) from None
