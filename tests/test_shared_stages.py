"""Work done once is not done twice: a HEFT arm whose stage 1 equals a LoRA arm's run trains stage 2 on it."""
from __future__ import annotations

import json

from safetensors.torch import load_file

from heft_core.study import StudySpec
from heft_core.study_runner import load_study_dir, run_study_in_process


def _predictions(run_dir):
    return [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]


def _tensors(run_dir):
    return {name: tensor for file in sorted(run_dir.glob("*.safetensors")) for name, tensor in load_file(file).items()}


def test_heft_trains_stage_2_on_the_lora_arms_run_and_ends_as_with_its_own_stage_1(
    tiny_model, easy_data, tmp_path, monkeypatch
) -> None:
    from heft_core import train as train_lib

    spec = StudySpec.from_dict({
        "name": "shared", "seeds": [3],
        "arms": [{"method": "lora", "lora_epochs": 1}, {"method": "heft", "lora_epochs": 1, "reft_epochs": 1},
                 {"method": "heft", "lora_epochs": 2, "reft_epochs": 1}],  # another schedule: not shared
        "base": {
            "model": tiny_model, "data": "test:easy", "train_size": 16, "eval_size": 16, "max_length": 48,
            "precision": "no", "reft.layers": [1, 2], "reft.positions": "l1",
            "lora_stage.learning_rate": 3e-3, "reft_stage.learning_rate": 3e-3,
        },
    })
    plan = spec.plan()
    assert [run.stage1_from for run in plan] == [None, 0, None] and plan[0].config.keep_epoch_checkpoints
    stages: list[tuple[str, str]] = []
    original = train_lib._Trainer.run_stage

    def counting(self, stage, model, settings):
        stages.append((self.config.name, stage))
        return original(self, stage, model, settings)

    monkeypatch.setattr(train_lib._Trainer, "run_stage", counting)
    out = tmp_path / "study"
    report = run_study_in_process(spec, out, progress=False, data=easy_data, resamples=100)
    names = [run.config.name for run in plan]
    assert stages == [(names[0], "lora"), (names[1], "reft"), (names[2], "lora"), (names[2], "reft")]

    alone = tmp_path / "alone"  # the same HEFT run with its own stage 1
    train_lib.train(plan[1].config, alone, data=easy_data)
    shared = out / "runs" / plan[1].dir_name
    assert _predictions(shared) == _predictions(alone)
    mine, theirs = _tensors(shared), _tensors(alone)
    assert mine.keys() == theirs.keys() and mine
    assert all((mine[name] == theirs[name]).all() for name in mine)

    row = next(r for r in report.runs if r.arm == "HEFT 1+1")
    assert row.stage1_from == plan[0].dir_name and row.train_seconds_as_run < row.train_seconds
    assert "## Shared stages" in report.to_markdown()
    written = json.loads((out / "results.json").read_text())  # it names no path of this machine
    assert str(tmp_path) not in (out / "results.json").read_text() + (out / "results.csv").read_text()
    assert {run["run_dir"] for run in written["runs"]} == {f"runs/{run.dir_name}" for run in plan}
    _, outcomes = load_study_dir(out)  # the sharing is recorded with the study
    assert outcomes[1].shared_stage1_from == f"runs/{plan[0].dir_name}"
    trained = len(stages)  # the run alone above trained both of its stages: 6
    again = run_study_in_process(spec, out, progress=False, data=easy_data, resamples=100, resume=True)
    assert len(stages) == trained == 6  # resumed: nothing trained again
    assert next(r for r in again.runs if r.arm == "HEFT 1+1").stage1_from == plan[0].dir_name


def test_a_study_stopped_part_way_continues_each_run_from_its_checkpoint(
    tiny_model, easy_data, tmp_path, monkeypatch
) -> None:
    """``study --resume`` after a stop (Ctrl-C here; a kill works the same, the checkpoints are on disk) goes on
    from the interrupted run's checkpoint: the HEFT run that started from the LoRA run's stage 1 keeps that
    sharing, trains only what it had not, and ends with the weights and answers of an uninterrupted run."""
    import pytest

    from heft_core import study_runner
    from heft_core import train as train_lib

    spec = StudySpec.from_dict({
        "name": "stopped", "seeds": [5],
        "arms": [{"method": "lora", "lora_epochs": 1}, {"method": "heft", "lora_epochs": 1, "reft_epochs": 2}],
        "base": {
            "model": tiny_model, "data": "test:easy", "train_size": 16, "eval_size": 16, "max_length": 48,
            "precision": "no", "reft.layers": [1, 2], "reft.positions": "l1", "lora_stage.batch_size": 8,
            "reft_stage.batch_size": 8, "lora_stage.learning_rate": 3e-3, "reft_stage.learning_rate": 3e-3,
        },
    })
    plan = spec.plan()
    heft = plan[1].config
    original_step = study_runner._StepBar.on_step

    def stop_in_the_second_reft_epoch(self, event):
        original_step(self, event)
        if event.stage == "reft" and event.epoch > 1.0:  # after the first ReFT epoch's checkpoint
            raise KeyboardInterrupt

    monkeypatch.setattr(study_runner._StepBar, "on_step", stop_in_the_second_reft_epoch)
    out = tmp_path / "study"
    with pytest.raises(KeyboardInterrupt):
        run_study_in_process(spec, out, progress=False, data=easy_data, resamples=100)
    heft_dir = out / "runs" / plan[1].dir_name
    assert not (heft_dir / "run.json").exists() and (heft_dir / study_runner.WALL_FILE).exists()
    monkeypatch.setattr(study_runner._StepBar, "on_step", original_step)

    stages: list[tuple[str, str]] = []
    resumed_from: list[int] = []
    original_stage = train_lib._Trainer.run_stage

    def counting(self, stage, model, settings):
        stages.append((self.config.name, stage))
        if self.resume_from is not None:
            resumed_from.append(self.resume_from.step)
        return original_stage(self, stage, model, settings)

    monkeypatch.setattr(train_lib._Trainer, "run_stage", counting)
    report = run_study_in_process(spec, out, progress=False, data=easy_data, resamples=100, resume=True)
    assert stages == [(heft.name, "reft")]  # the LoRA run is finished; HEFT's stage 1 is still the shared one
    assert resumed_from and resumed_from[0] > 2  # from its ReFT checkpoint, not from the stage boundary

    alone = tmp_path / "alone"
    train_lib.train(heft, alone, data=easy_data)
    assert _predictions(heft_dir) == _predictions(alone)
    mine, theirs = _tensors(heft_dir), _tensors(alone)
    assert mine.keys() == theirs.keys() and all((mine[name] == theirs[name]).all() for name in mine)
    row = next(r for r in report.runs if r.arm == plan[1].arm)
    assert row.stage1_from == plan[0].dir_name and row.wall_seconds > 0


def _queue_study(engine, spec):
    """The study's planned runs as queued database rows, as the Studies tab queues them."""
    from storage import queries

    plan = spec.plan()
    queries.create_study(engine, name=spec.name, spec=spec.to_dict(), runs=[
        {"name": run.config.name, "method": run.method, "config": run.config.to_dict(), "base_model": run.config.model,
         "data_source": run.config.data, "arm": run.arm, "seed": run.seed} for run in plan])
    return plan


def test_where_runs_train_side_by_side_a_heft_run_waits_for_its_lora_twin(tmp_path) -> None:
    """With several slots (GPUs, Ray nodes) the queue would start HEFT beside the LoRA run that trains its stage 1:
    the claim passes it over until that run ends, then it starts (and shares); a failed twin releases it."""
    from app.shared_stages import waits_for_shared_stage1
    from heft_common.vocabulary import RunStatus
    from storage import queries
    from storage.db import open_db

    engine = open_db(tmp_path / "heft.db")
    spec = StudySpec.from_dict({
        "name": "side by side", "seeds": [1, 2],
        "arms": [{"method": "heft", "lora_epochs": 1, "reft_epochs": 1}, {"method": "lora", "lora_epochs": 1},
                 {"method": "base"}],
        "base": {"model": "some/model", "data": "test:easy", "train_size": 16, "eval_size": 16},
    })
    plan = _queue_study(engine, spec)
    # A later LoRA run keeps the checkpoint an earlier HEFT run's stage 2 would start from.
    assert [run.config.keep_epoch_checkpoints for run in plan if run.method == "lora"] == [True, True]

    def claim():
        run = queries.claim_next_run(engine, 1, waits=lambda r: waits_for_shared_stage1(engine, r))
        return None if run is None else (run.arm, run.seed)

    # The HEFT runs come first in the queue, yet each waits for its seed's LoRA run.
    assert [claim() for _ in range(4)] == [("LoRA 1", 1), ("Base", 1), ("LoRA 1", 2), ("Base", 2)]
    assert claim() is None
    rows = {(r.arm, r.seed): r for r in queries.study_runs(engine, 1)}
    queries.finish_run(engine, rows[("LoRA 1", 2)].id, RunStatus.FAILED, error="out of memory")
    assert claim() == ("HEFT 1+1", 2)  # its twin failed: it trains its own stage 1
    assert claim() is None
    queries.finish_run(engine, rows[("LoRA 1", 1)].id, RunStatus.COMPLETED)
    assert claim() == ("HEFT 1+1", 1)
