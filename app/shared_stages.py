"""Work done once is not done twice, in the app: a study's HEFT run whose stage 1 equals a completed LoRA run's.

The CLI's study runner plans the sharing (``heft_core.study.PlannedRun.stage1_from``); runs queued from the
Studies tab are separate database rows, so the worker looks the matching run up here before a HEFT run
starts, both for a run trained in a child process (``app.child``) and for one sent to a Ray cluster
(``app.ray_executor``, which ships the stage-boundary checkpoint along with the task). Where several runs train
at once (GPU slots, Ray nodes), such a HEFT run waits in the queue while its LoRA twin is queued or training
(:func:`waits_for_shared_stage1`), so that it does not train the same stage 1 beside it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from heft_common.vocabulary import ACTIVE_STATUSES, RunStatus
from storage import queries


def _sharing_candidate(record: Any) -> Any:
    """The run's config when it is a study's one-process HEFT run (the runs that can share), else None."""
    from heft_core.config import RunConfig

    if record.study_id is None or record.method != "heft":
        return None
    config = RunConfig.from_dict(record.config)
    # (several processes would each write the checkpoint: such a run trains its own stage 1)
    return config if config.processes == 1 else None


def _twins(engine: Any, record: Any, config: Any) -> list[Any]:
    """The study's LoRA runs whose stage 1 is this HEFT run's (``heft_core.study.stage1_key``)."""
    from heft_core.config import RunConfig
    from heft_core.study import stage1_key

    key = stage1_key(config)
    return [source for source in queries.study_runs(engine, record.study_id)
            if source.method == "lora" and stage1_key(RunConfig.from_dict(source.config)) == key]


def waits_for_shared_stage1(engine: Any, record: Any) -> bool:
    """True for a queued HEFT run whose stage-1 twin is still queued or training: it starts once the twin ends
    (``storage.runs.claim_next_run``'s ``waits``). A twin that fails or is cancelled releases it (it then
    trains both stages)."""
    config = _sharing_candidate(record)
    return config is not None and any(twin.status in ACTIVE_STATUSES for twin in _twins(engine, record, config))


def start_from_shared_stage1(engine: Any, record: Any, out: Path) -> str | None:
    """Put in ``out`` the stage-boundary checkpoint of the study's completed LoRA run whose stage 1 equals this
    HEFT run's (``heft_core.study.stage1_key``: seed, data, settings, schedule), so that training resumes at
    stage 2. Returns the line for the run's log, or None when no such run exists (the run trains both stages)."""
    from heft_core.study_runner import start_from_shared_stage1 as start_from

    config = _sharing_candidate(record)
    if config is None:
        return None
    for source in _twins(engine, record, config):
        if source.status != RunStatus.COMPLETED.value or not source.artifact_dir:
            continue
        if start_from(Path(source.artifact_dir), config, out) is not None:
            return f"stage 1 is run #{source.id}'s finished LoRA ({source.name}); training stage 2 only"
    return None
