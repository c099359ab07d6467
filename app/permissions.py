"""Who may do what in HEFT Studio, and what a refused action says (plain module: no Gradio, no SQL).

Outside public mode every visitor may do everything (a deployment that wants logins sets
``HEFT_AUTH``, and then only those users reach the page at all). Public mode is on on a Hugging
Face Space (``SPACE_ID`` is set) or wherever ``HEFT_PUBLIC=1``: anyone may read runs, compare,
read study reports and logs, and use Ask; only owners may queue, cancel, resume, delete, push an
export or import a study. Owners are

- Hugging Face accounts signed in with the Space's OAuth (``gr.LoginButton``) whose user name, or one
  of whose organisations, is listed in ``HEFT_OWNERS`` (comma separated, case-insensitive);
- users logged in with ``HEFT_AUTH`` (the deployment gave them a password: they are its owners).

Limits in public mode: at most ``HEFT_MAX_QUEUED`` runs queued or running at once (the run table
records no owner, so on a shared Space the count is the Space's, which with one owner is that
owner's), and runs whose base model would not fit the machine's memory are refused before queueing.
``app.service`` applies these rules; the UI and the API show the messages.
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Any, Mapping

from heft_common.errors import HeftError

PUBLIC_ENV = "HEFT_PUBLIC"
OWNERS_ENV = "HEFT_OWNERS"
MAX_QUEUED_ENV = "HEFT_MAX_QUEUED"
SPACE_ENV = "SPACE_ID"  # set by the hub in every Space
DEFAULT_MAX_QUEUED = 6
# Training holds the base weights (fp32 on CPU, the half dtype on a GPU), their gradients' activations and the
# optimizer state of the small adapter: ask for this much more than the weights alone before starting.
MEMORY_HEADROOM = 1.5


class Action(str, enum.Enum):
    """The actions public mode keeps for owners."""

    TRAIN = "train"  # queue a run, a batch or a study; re-queue a run
    RESUME = "resume"
    CANCEL = "cancel"
    DELETE = "delete"
    PUSH = "push"  # push an export to the hub
    IMPORT = "import"  # import a study directory


ACTION_WORDS = {
    Action.TRAIN: "queueing runs", Action.RESUME: "resuming runs", Action.CANCEL: "cancelling runs",
    Action.DELETE: "deleting runs", Action.PUSH: "pushing exports to the hub", Action.IMPORT: "importing studies",
}


class PermissionRefused(HeftError):
    """An action this visitor may not take here; the message says why and how to get the right."""


@dataclass(frozen=True)
class Actor:
    """Who is asking: a signed-in Hugging Face account ("hf"), a HEFT_AUTH login ("login"), a command on the machine
    ("local"), or nobody known ("anonymous")."""

    name: str | None = None
    orgs: tuple[str, ...] = ()
    via: str = "anonymous"

    @property
    def anonymous(self) -> bool:
        return self.via == "anonymous"


ANONYMOUS = Actor()
LOCAL = Actor("local", via="local")  # a command run on the machine itself (its shell user owns the data home)


def _org_names(orgs: Any) -> tuple[str, ...]:
    """Organisation names from the hub's OAuth userinfo ("orgs": [{"preferred_username", "name", ...}])."""
    names = []
    for org in orgs or ():
        if isinstance(org, Mapping):
            name = org.get("preferred_username") or org.get("name")
        else:
            name = org
        if name:
            names.append(str(name))
    return tuple(names)


def actor_from(profile: Mapping[str, Any] | None = None, request: Any = None) -> Actor:
    """The actor of a Gradio event: its OAuth profile (``gr.OAuthProfile``, a dict of the hub's userinfo) if
    signed in, else its ``gr.Request``'s HEFT_AUTH user name, else anonymous."""
    if profile:
        name = profile.get("preferred_username") or getattr(profile, "username", None)
        if name:
            return Actor(str(name), _org_names(profile.get("orgs")), via="hf")
    username = getattr(request, "username", None) if request is not None else None
    if username:
        return Actor(str(username), via="login")
    return ANONYMOUS


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Policy:
    """The rules in force, read from the environment (``Policy.from_env()``) each time they are applied."""

    public: bool = False
    owners: frozenset[str] = frozenset()
    space_id: str | None = None
    max_queued: int = DEFAULT_MAX_QUEUED

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Policy":
        env = os.environ if env is None else env
        space = (env.get(SPACE_ENV) or "").strip() or None
        owners = frozenset(name.strip().lstrip("@").lower() for name in (env.get(OWNERS_ENV) or "").split(",")
                           if name.strip())
        raw = (env.get(MAX_QUEUED_ENV) or "").strip()
        try:
            max_queued = int(raw) if raw else DEFAULT_MAX_QUEUED
        except ValueError:
            raise HeftError(f"{MAX_QUEUED_ENV} must be a whole number of runs, got {raw!r}") from None
        return cls(public=bool(space) or _flag(env.get(PUBLIC_ENV)), owners=owners, space_id=space,
                   max_queued=max(0, max_queued))

    @property
    def on_space(self) -> bool:
        return self.space_id is not None

    def is_owner(self, actor: Actor | None) -> bool:
        actor = actor or ANONYMOUS
        if not self.public or actor.via in ("login", "local"):
            return True
        if actor.via != "hf" or not actor.name:
            return False
        return bool({actor.name.lower(), *(org.lower() for org in actor.orgs)} & self.owners)

    def how_to_get_it(self) -> str:
        where = "this Space" if self.on_space else "this public deployment"
        sign_in = ("sign in with your Hugging Face account (the Sign in button at the top) if you are one of its "
                   f"owners ({OWNERS_ENV})" if self.on_space else
                   "log in as one of its owners (a HEFT_AUTH login)")
        return (f"To train, {sign_in}, or duplicate {where} (the Duplicate button at the top) and train on your "
                "own copy.")

    def notice(self) -> str:
        """The line public mode shows at the top of the page."""
        where = "This Space" if self.on_space else "This deployment"
        return (f"**{where} is public:** anyone can read every run, compare them, read study reports and ask the "
                f"trained models. Training, cancelling, deleting, pushing and importing are for its owners. "
                f"{self.how_to_get_it()}")

    def refusal(self, actor: Actor | None, action: Action) -> str | None:
        """Why ``actor`` may not take ``action`` here, or None when it may."""
        if self.is_owner(actor):
            return None
        actor = actor or ANONYMOUS
        words = ACTION_WORDS[Action(action)]
        where = "this Space" if self.on_space else "this public deployment"
        if actor.anonymous:
            who = f"Visitors of {where} can read every run and study and use Ask; {words} is for its owners."
        elif not self.owners:
            who = (f"@{actor.name} is signed in, but {where} lists no owners ({OWNERS_ENV} is not set), so "
                   f"{words} is off here.")
        else:
            who = f"@{actor.name} is not among the owners of {where} ({OWNERS_ENV}); {words} is for its owners."
        return f"{who} {self.how_to_get_it()}"

    def check(self, actor: Actor | None, action: Action) -> None:
        """Raise PermissionRefused (its message: :meth:`refusal`) unless ``actor`` may take ``action``."""
        message = self.refusal(actor, action)
        if message is not None:
            raise PermissionRefused(message)

    def queue_refusal(self, active_runs: int, new_runs: int) -> str | None:
        """In public mode: why queueing ``new_runs`` more is refused with ``active_runs`` queued or running."""
        if not self.public or active_runs + new_runs <= self.max_queued:
            return None
        return (f"This shared deployment holds at most {self.max_queued} queued or running runs at once "
                f"({MAX_QUEUED_ENV}); {active_runs} are there now and this would add {new_runs}. Wait for some to "
                "finish, cancel some, or duplicate the Space to train without this limit.")

    def hardware_refusal(self, model: str, base_params: int, bytes_per_param: int, memory_bytes: int | None,
                         device: str) -> str | None:
        """In public mode: why a run on ``model`` (``base_params`` weights) does not fit ``memory_bytes``."""
        if not self.public or not memory_bytes:
            return None
        needed = base_params * bytes_per_param * MEMORY_HEADROOM
        if needed <= memory_bytes:
            return None
        gib = 1024 ** 3
        return (f"{model} has about {base_params / 1e9:.2f} B weights: training it needs about {needed / gib:.0f} GiB "
                f"of {device} memory and this machine has {memory_bytes / gib:.0f} GiB. Pick a smaller model, or "
                "duplicate the Space onto larger hardware.")


def base_params(shape: Mapping[str, Any]) -> int:
    """The weights in the decoder layers' linear modules (heft_core.estimates.model_shape's "linear"): the bulk
    of a causal LM's parameters (embeddings, which the shape does not hold, are left out: an under-estimate)."""
    return int(shape["num_layers"]) * sum(int(i) * int(o) for i, o in shape["linear"].values())
