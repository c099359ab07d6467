"""Export in the app (issue 16): the service functions behind the Runs view, the /export_run API through
gradio_client, and the Runs view's Export section in a real browser.

The runs are the short trained runs of tests/conftest.py (``quick_runs``), recorded in the database
as a worker would have recorded them.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

from app import service
from heft_common.errors import ExportError, RunNotFound
from heft_core.artifacts import load_run
from storage import queries
from storage.db import open_db
from tests.servers import CHROMIUM
from tests.test_export import FakeHub, no_token  # noqa: F401  (no_token: fixture)


def record(engine, run_dir: Path | None, method: str, status: str = "completed"):
    """A run row for ``run_dir`` as the worker records it (base runs: no directory needed)."""
    config = load_run(run_dir).config.to_dict() if run_dir is not None else {"method": method}
    run = queries.start_external_run(engine, worker_pid=os.getpid(), name=f"quick {method}", method=method,
                                     config=config, base_model="tiny", data_source="test:easy")
    if run_dir is not None:
        queries.set_artifact_dir(engine, run.id, run_dir)
    if status != "running":
        queries.finish_run(engine, run.id, status)
    return queries.get_run(engine, run.id)


def manifest_of(archive: str | Path) -> dict:
    with zipfile.ZipFile(archive) as bundle:
        [name] = [n for n in bundle.namelist() if n.endswith("/heft_export.json")]
        return json.loads(bundle.read(name))


@pytest.fixture
def engine(home):
    return open_db(home / "heft.db")


def test_export_options_follow_method_and_status(engine, quick_runs):
    lora = record(engine, quick_runs["lora"], "lora")
    reft = record(engine, quick_runs["reft"], "reft")
    base = record(engine, None, "base")
    running = record(engine, quick_runs["heft"], "heft", status="running")
    assert service.export_options(lora) == service.ExportOptions(
        [("LoRA adapter (peft)", "adapter"), ("Merged model (transformers)", "merged")])
    assert service.export_options(reft).formats == [("Interventions (pyreft)", "reft")]
    for run, why in ((base, "Base (zero-shot) run has nothing trained"), (running, "is running"),
                     (None, "select a run")):
        options = service.export_options(run)
        assert not options.allowed and options.formats == [] and why in options.note
    # The live view carries the options when a run is opened, and leaves them alone on a quiet tick.
    view = service.live_view(engine, lora.id, None, full=True)
    assert view.export == service.export_options(lora)
    assert service.live_view(engine, lora.id, view.state, full=False).export is None
    assert service.live_view(engine, 999, view.state, full=False).export == service.export_options(None)


def test_export_run_archive(engine, quick_runs, tmp_path):
    lora = record(engine, quick_runs["lora"], "lora")
    base = record(engine, None, "base")
    archive = service.export_run_archive(engine, lora.id, "merged", tmp_path)
    assert archive == tmp_path / f"heft-run-{lora.id:06d}-merged.zip"
    manifest = manifest_of(archive)
    assert (manifest["format"], manifest["method"], manifest["run"]) == ("merged", "lora", quick_runs["lora"].name)
    default = service.export_run_archive(engine, lora.id, "")  # the method's default, in a fresh directory
    assert manifest_of(default)["format"] == "adapter" and default.parent != tmp_path
    before = set(tmp_path.iterdir())
    for run_id, fmt, error, message in (
        (lora.id, "reft", ExportError, "does not apply to a LoRA run"),
        (lora.id, "../../evil", ExportError, "not an export format"),
        (base.id, "adapter", ExportError, "nothing trained to export"),
        (999, "adapter", RunNotFound, "run 999 does not exist"),
        ("abc", "adapter", RunNotFound, "positive integer"),
    ):
        with pytest.raises(error, match=message):
            service.export_run_archive(engine, run_id, fmt, tmp_path)
    assert set(tmp_path.iterdir()) == before  # nothing written for a refused export
    assert service.export_run_payload(engine, 999, "") == {"error": "run 999 does not exist"}
    assert manifest_of(service.export_run_payload(engine, lora.id, "adapter")["path"])["format"] == "adapter"


@pytest.mark.usefixtures("no_token")
def test_push_run_uploads_an_export_with_the_environment_token(engine, quick_runs, monkeypatch, caplog):
    reft = record(engine, quick_runs["reft"], "reft")
    hub = FakeHub()
    with pytest.raises(ExportError, match="no Hugging Face token.*nothing was uploaded"):
        service.push_run(engine, reft.id, "reft", "someone/heft-reft", api=hub)
    with pytest.raises(ExportError, match="repo id"):
        service.push_run(engine, reft.id, "reft", "bad repo/..", api=hub)
    assert hub.calls == []
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    uploaded = {}

    class CheckingHub(FakeHub):
        def upload_folder(self, *args, **kwargs):  # the folder exists only while the push runs
            uploaded["manifest"] = json.loads((Path(kwargs["folder_path"]) / "heft_export.json").read_text())
            super().upload_folder(*args, **kwargs)

    hub = CheckingHub()
    url = service.push_run(engine, reft.id, "", "someone/heft-reft", private=True, api=hub)
    assert url == "https://huggingface.co/someone/heft-reft"
    (_, _, create), (_, _, upload) = hub.calls
    assert create["private"] is True and upload["repo_id"] == "someone/heft-reft"
    assert create["token"] == upload["token"] == "hf_secret_value" and "hf_secret_value" not in caplog.text
    assert (uploaded["manifest"]["format"], uploaded["manifest"]["method"]) == ("reft", "reft")
    assert not Path(upload["folder_path"]).exists()  # the temporary export is gone


def test_api_export_run_downloads_the_zip(app_client, quick_runs):
    client, engine, _ = app_client
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert "/export_run" in endpoints
    heft = record(engine, quick_runs["heft"], "heft")
    base = record(engine, None, "base")
    downloaded = client.predict(heft.id, "merged", api_name="/export_run")
    assert isinstance(downloaded, str) and Path(downloaded).name == f"heft-run-{heft.id:06d}-merged.zip"
    manifest = manifest_of(downloaded)  # a local copy: gradio_client downloaded it
    assert (manifest["format"], manifest["method"]) == ("merged", "heft")
    assert sorted(manifest["files"]) == ["README.md", "heft_export.json", "merged", "reft"]
    assert client.predict(9999, "", api_name="/export_run") == {"error": "run 9999 does not exist"}
    assert "nothing trained to export" in client.predict(base.id, "", api_name="/export_run")["error"]
    assert "not an export format" in client.predict(heft.id, "onnx", api_name="/export_run")["error"]


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing: install Debian's chromium")
@pytest.mark.usefixtures("no_token")
def test_browser_export_offers_the_download(studio, quick_runs, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, engine, _ = studio
    lora = record(engine, quick_runs["lora"], "lora")
    base = record(engine, None, "base")
    shots = Path(os.environ.get("HEFT_SHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
            # A zero-shot run: the Export section says why there is nothing to export.
            page.goto(f"{url}?run={base.id}")
            expect(page.locator("#heft-progress")).to_contain_text(f"Run #{base.id}", timeout=120_000)
            expect(page.locator("#heft-export-note")).to_contain_text("nothing trained to export", timeout=60_000)
            expect(page.locator("#heft-export-btn")).to_be_disabled()
            # A completed LoRA run: its formats, the default first; Export offers the zip for download.
            run_box = page.locator("#heft-run-id input")
            run_box.fill(str(lora.id))
            run_box.press("Enter")
            expect(page.locator("#heft-progress")).to_contain_text(f"Run #{lora.id}", timeout=60_000)
            expect(page.locator("#heft-export-btn")).to_be_enabled(timeout=60_000)
            expect(page.get_by_label("export format")).to_have_value("LoRA adapter (peft)")
            page.locator("#heft-export-btn").click()
            expect(page.locator("#heft-export-msg")).to_contain_text("Exported as", timeout=60_000)
            name = f"heft-run-{lora.id:06d}-adapter.zip"
            link = page.locator(f"#heft-export-file a[href$='/{name}']")  # the file's download link
            expect(link).to_be_visible(timeout=60_000)
            with page.expect_download() as info:
                link.click()
            saved = tmp_path / "downloaded.zip"
            info.value.save_as(saved)
            assert manifest_of(saved)["format"] == "adapter"
            # Push to Hub without a token: a clear message, nothing uploaded.
            page.get_by_label("Hub repo id").fill("someone/heft-lora")
            page.locator("#heft-push-btn").click()
            expect(page.locator("#heft-export-msg")).to_contain_text("no Hugging Face token", timeout=60_000)
            page.locator("#heft-export").scroll_into_view_if_needed()
            page.locator("#heft-export-btn").click()  # back to the offered download, for the screenshot
            expect(page.locator("#heft-export-msg")).to_contain_text("Exported as", timeout=60_000)
            expect(link).to_be_visible(timeout=60_000)
            page.screenshot(path=str(shots / "export.png"), full_page=True)
        finally:
            browser.close()
