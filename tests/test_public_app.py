"""Public mode through the named API (gradio_client against the served app): visitors read and ask, owners train."""
from __future__ import annotations

import contextlib
import json
import shutil

from app import study_import
from app.permissions import LOCAL
from storage import queries
from storage.db import open_db
from tests.conftest import quick_config
from tests.test_study_import import study_dir  # noqa: F401  (the module's tiny CLI study, a fixture)

REFUSED = "is for its owners"


@contextlib.contextmanager
def _served(engine, **launch):
    from app.launch import free_port
    from app.ui import build_demo, launch_kwargs

    demo = build_demo(engine)
    port = free_port()
    demo.launch(prevent_thread_lock=True, server_port=port, quiet=True, **launch_kwargs(), **launch)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.heft_ask_service.close()
        demo.close()


def _registry(engine):
    return ([(r.id, r.status, r.name) for r in queries.list_runs(engine, limit=None)],
            [s.id for s in queries.list_studies(engine)])


def test_visitors_read_and_ask_but_cannot_change_anything(study_dir, home, tmp_path, monkeypatch,  # noqa: F811
                                                           tiny_model, data_dir):
    from gradio_client import Client, handle_file

    engine = open_db(home / "heft.db")
    imported = study_import.import_study(engine, study_dir, LOCAL)
    base_id, lora_id, heft_id = imported.run_ids
    queued = queries.create_run(engine, name="someone's run", method="lora", config={"method": "lora"},
                                base_model=tiny_model, data_source=data_dir)
    archive = shutil.make_archive(str(tmp_path / "study"), "zip", root_dir=study_dir.parent, base_dir=study_dir.name)
    monkeypatch.setenv("HEFT_PUBLIC", "1")
    before = _registry(engine)
    config = json.dumps(quick_config(tiny_model, "lora", data=data_dir).to_dict())
    with _served(engine) as url:
        client = Client(url, verbose=False)
        calls = {
            "/start_run": (config,), "/cancel_run": (queued.id,), "/resume_run": (queued.id,),
            "/delete_run": (lora_id,), "/push_run": (lora_id, "", "someone/heft", False),
            "/import_study": (handle_file(archive),), "/start_study": ("name: s\narms: [{method: base}]",),
            "/cancel_study": (imported.study_id,),
        }
        for endpoint, args in calls.items():
            answer = client.predict(*args, api_name=endpoint)
            assert REFUSED in answer.get("error", ""), (endpoint, answer)
            assert "duplicate this public deployment" in answer["error"], endpoint
        assert _registry(engine) == before
        # Reading works: runs, a run's detail, the study's report, and Ask with the imported runs.
        listed = client.predict("", api_name="/list_runs")
        assert {run["id"] for run in listed} == {base_id, lora_id, heft_id, queued.id}
        detail = client.predict(lora_id, 0, api_name="/run_detail")
        assert detail["status"] == "completed" and detail["metrics"] and "imported from tiny import" in detail["name"]
        report = client.predict(imported.study_id, api_name="/study_report")
        assert [arm["arm"] for arm in report["arms"]] == ["Base", "LoRA 1", "HEFT 1+1"]
        asked = client.predict("the river town road", "is the bird red",
                               json.dumps({"lora": lora_id, "heft": heft_id}), api_name="/ask")
        assert [a["slot"] for a in asked["answers"]] == ["base", "lora", "heft"], asked
    assert _registry(engine) == before


def test_a_heft_auth_owner_trains_in_public_mode(home, monkeypatch, tiny_model, data_dir):
    from gradio_client import Client

    from app.login import login_options

    engine = open_db(home / "heft.db")
    monkeypatch.setenv("HEFT_PUBLIC", "1")
    config = json.dumps(quick_config(tiny_model, "lora", data=data_dir).to_dict())
    with _served(engine, **login_options([("owner", "s3cret")])) as url:
        client = Client(url, verbose=False, auth=("owner", "s3cret"))
        started = client.predict(config, api_name="/start_run")
        assert "run_ids" in started, started
        [run_id] = started["run_ids"]
        assert client.predict(run_id, api_name="/cancel_run") == {"run_id": run_id, "status": "cancelled"}
        assert client.predict(run_id, api_name="/delete_run")["deleted"] is True
