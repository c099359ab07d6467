"""Public mode without a browser: who may do what (app.permissions) and the service layer applying it."""
from __future__ import annotations

import gradio as gr
import pytest

from app import permissions, service, studies
from app.permissions import ANONYMOUS, Action, Actor, PermissionRefused, Policy, actor_from
from heft_core.estimates import KNOWN_SHAPES, LLAMA2_7B
from heft_core.study import StudySpec
from storage import queries
from storage.db import open_db
from tests.conftest import quick_config

GIB = 1024 ** 3


def _profile(username: str, orgs: tuple[str, ...] = ()) -> gr.OAuthProfile:
    """What Gradio injects for a visitor signed in with Hugging Face (the hub's OAuth userinfo)."""
    return gr.OAuthProfile({"name": username.title(), "preferred_username": username, "picture": "",
                            "profile": f"https://huggingface.co/{username}",
                            "orgs": [{"preferred_username": org, "name": org.title()} for org in orgs]})


def test_public_mode_is_on_on_a_space_or_with_heft_public() -> None:
    assert not Policy.from_env({}).public
    assert Policy.from_env({"HEFT_PUBLIC": "1"}).public and not Policy.from_env({"HEFT_PUBLIC": "1"}).on_space
    space = Policy.from_env({"SPACE_ID": "someone/heft-studio", "HEFT_OWNERS": "Alice, @heft-lab"})
    assert space.public and space.on_space and space.owners == {"alice", "heft-lab"}
    assert Policy.from_env({"HEFT_PUBLIC": "0"}).public is False
    with pytest.raises(permissions.HeftError, match="HEFT_MAX_QUEUED"):
        Policy.from_env({"HEFT_MAX_QUEUED": "many"})


def test_visitors_read_owners_act_and_each_refusal_says_how_to_get_the_right() -> None:
    space = Policy.from_env({"SPACE_ID": "someone/heft-studio", "HEFT_OWNERS": "alice,heft-lab"})
    for action in Action:
        message = space.refusal(ANONYMOUS, action)
        assert message and "Visitors of this Space" in message and permissions.ACTION_WORDS[action] in message
        assert "sign in with your Hugging Face account" in message and "duplicate this Space" in message
    alice, bob = actor_from(_profile("Alice")), actor_from(_profile("bob"))
    lab_member = actor_from(_profile("carol", orgs=("heft-lab",)))
    assert (alice.via, alice.name) == ("hf", "Alice") and lab_member.orgs == ("heft-lab",)
    assert all(space.refusal(who, action) is None for who in (alice, lab_member) for action in Action)
    assert "@bob is not among the owners of this Space (HEFT_OWNERS)" in space.refusal(bob, Action.TRAIN)
    login = actor_from(None, gr.Request(username="ops"))  # a HEFT_AUTH user: the deployment's owner
    assert login == Actor("ops", via="login") and space.refusal(login, Action.DELETE) is None
    assert actor_from(None, None) is ANONYMOUS and actor_from(None, gr.Request()) is ANONYMOUS
    with pytest.raises(PermissionRefused, match="pushing exports"):
        space.check(ANONYMOUS, Action.PUSH)
    # Not public: everyone may do everything; public without owners: nobody signed in may train.
    assert Policy.from_env({}).refusal(ANONYMOUS, Action.DELETE) is None
    assert "lists no owners" in Policy.from_env({"SPACE_ID": "x/y"}).refusal(alice, Action.TRAIN)
    elsewhere = Policy.from_env({"HEFT_PUBLIC": "1"}).refusal(ANONYMOUS, Action.TRAIN)
    assert "this public deployment" in elsewhere and "HEFT_AUTH login" in elsewhere


def test_limits_the_queue_cap_and_the_hardware() -> None:
    space = Policy.from_env({"SPACE_ID": "x/y", "HEFT_MAX_QUEUED": "3"})
    assert space.queue_refusal(2, 1) is None
    assert "at most 3 queued or running runs" in space.queue_refusal(2, 2)
    assert Policy.from_env({}).queue_refusal(100, 100) is None
    seven_b = permissions.base_params(KNOWN_SHAPES[LLAMA2_7B])
    assert 6.0e9 < seven_b < 7.0e9  # the decoder's linear weights: 6.5 B of Llama-2-7B's 6.7 B
    message = space.hardware_refusal(LLAMA2_7B, seven_b, 4, 16 * GIB, "CPU")  # CPU basic: 16 GB
    assert message and "6.48 B weights" in message and "this machine has 16 GiB" in message
    assert space.hardware_refusal(LLAMA2_7B, seven_b, 2, 80 * GIB, "GPU") is None
    assert space.hardware_refusal("tiny", 10_000, 4, 16 * GIB, "CPU") is None


def test_the_service_applies_the_rules(tmp_path, home, monkeypatch, tiny_model, data_dir) -> None:
    engine = open_db(tmp_path / "heft.db")
    config = quick_config(tiny_model, "lora", data=data_dir)
    [queued] = service.submit_runs(engine, [config])  # not public: a visitor trains (the page is theirs)
    monkeypatch.setenv("SPACE_ID", "someone/heft-studio")
    monkeypatch.setenv("HEFT_OWNERS", "alice")
    monkeypatch.setenv("HEFT_MAX_QUEUED", "2")
    before = [(run.id, run.status) for run in queries.list_runs(engine)]
    refusals = {
        "start": lambda: service.submit_runs(engine, [config]),
        "cancel": lambda: service.cancel_run(engine, queued.id),
        "resume": lambda: service.resume_run(engine, queued.id),
        "requeue": lambda: service.requeue_run(engine, queued.id),
        "delete": lambda: service.delete_run(engine, queued.id),
        "push": lambda: service.push_run(engine, queued.id, None, "someone/model"),
        "study": lambda: studies.start_study(engine, "name: s\narms: [{method: base}]"),
        "cancel study": lambda: studies.cancel_study(engine, 1),
    }
    for what, action in refusals.items():
        with pytest.raises(PermissionRefused, match="Visitors of this Space"):
            action()
    assert [(run.id, run.status) for run in queries.list_runs(engine)] == before
    assert "Not allowed here — Visitors" in service.start_run_payload(engine, "{}")["error"]
    assert "Visitors of this Space" in service.cancel_run_payload(engine, queued.id)["error"]
    assert "Not allowed here" in service.delete_run_payload(engine, queued.id)["error"]
    # A signed-in owner (the profile Gradio would inject) trains, up to the cap.
    alice = actor_from(_profile("alice"))
    [second] = service.submit_runs(engine, [config], actor=alice)
    with pytest.raises(PermissionRefused, match="at most 2 queued or running runs"):
        service.submit_runs(engine, [config], actor=alice)
    assert service.cancel_run(engine, second.id, alice) == "cancelled"
    # The hardware: a 7B model on CPU basic (16 GB) is refused before anything is downloaded or queued.
    monkeypatch.setattr("heft_core.hardware.training_memory", lambda: ("CPU", 16 * GIB, 4))
    big = StudySpec.from_dict({"name": "big", "arms": [{"method": "lora", "lora_epochs": 1}],
                               "base": {"model": LLAMA2_7B}}).plan()[0].config
    with pytest.raises(PermissionRefused, match="needs about 36 GiB of CPU memory"):
        service.submit_runs(engine, [big], actor=alice)
    assert len(queries.list_runs(engine)) == 2
