"""What the UI and the API do, as plain functions (testable without a browser).

Queue, cancel, re-queue and delete runs; read a run with its metrics. Bad configs are
rejected here, when queued, by heft_core's validation: no run is queued that would fail
on its options after a model has loaded.
"""
from __future__ import annotations

import os
import uuid
from typing import Any, Sequence

from heft_core.config import RunConfig
from heft_common.home import data_home
from storage import queries
from storage.models import Run


def check_config(config: RunConfig) -> None:
    """Model-shape and data-source checks (static checks ran when ``config`` was built)."""
    from heft_core.data import validate_source
    from heft_core.models import model_info

    info = model_info(config.model)
    config.validate_for_model(info.num_layers, set(info.linear_modules))
    validate_source(config.data)


METHOD_TITLES = {"base": "Base (zero-shot)", "lora": "LoRA", "reft": "ReFT", "heft": "HEFT"}


def default_name(config: RunConfig) -> str:
    """e.g. "HEFT 1+2 ep · embedded · boolq" (paths shortened to their last part)."""
    if config.name:
        return config.name
    epochs = "+".join(str(stage.epochs) for _, stage in config.stages()) or "0"
    return f"{METHOD_TITLES[config.method]} {epochs} ep · {_short(config.model)} · {_short(config.data)}"


def _short(ref: str) -> str:
    return os.path.basename(os.path.normpath(ref)) if os.sep in ref else ref


def submit_runs(engine: Any, configs: Sequence[RunConfig], batch: bool | None = None) -> list[Run]:
    """Validate every config first, then queue them all (one comparison batch if several)."""
    for config in configs:
        check_config(config)
    batch_id = uuid.uuid4().hex[:12] if (batch if batch is not None else len(configs) > 1) else None
    return [
        queries.create_run(
            engine, name=default_name(config), method=config.method, config=config.to_dict(), base_model=config.model,
            data_source=config.data, batch_id=batch_id, total_epochs=config.total_epochs,
        )
        for config in configs
    ]


def cancel_run(engine: Any, run_id: Any) -> str:
    return queries.request_cancel(engine, queries.validate_run_id(run_id))


def requeue_run(engine: Any, run_id: Any) -> Run:
    return queries.requeue(engine, queries.validate_run_id(run_id))


def delete_run(engine: Any, run_id: Any) -> bool:
    return queries.delete_run(engine, queries.validate_run_id(run_id), data_home())
