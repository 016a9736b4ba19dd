"""What an artefact was made from, and the one check every reader of it applies.

An artefact (latent shards, a controller, a world model) records the identity of the model it was
made from: its sha256 (the exact bytes), its step, and the facts that decide whether it can work
with a model at all (the codebook's size, the number of per-frame action codes, the colour mode).
A reader holds that record against the same facts of the model it is about to use:

    notes = check_made_from("controller.pt", recorded, "LAM best.pt", actual,
                            kind=("codebook_size", "action_codes", "in_channels"), allow_other=False)

A kind field that differs can never work (another codebook, grid codes for a LAM played by its
action code): always refused. Another model of the same kind (another sha256) is refused unless
the caller allows it (`--allow-other-checkpoint`), and the note returned then says so, for the
report. A field the artefact does not record (made before it recorded it) is not checked.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from common.errors import UserError

ALLOW_FLAG = "--allow-other-checkpoint"


def differences(recorded: Mapping, actual: Mapping, fields: Sequence[str]) -> list[str]:
    """The fields of `fields` that both name and that differ."""
    return [name for name in fields if name in recorded and name in actual and recorded[name] != actual[name]]


def describe(facts: Mapping, fields: Sequence[str]) -> str:
    return ", ".join(f"{name} {facts[name]}" for name in fields)


def check_made_from(artefact: str, recorded: Mapping, used_with: str, actual: Mapping, *,
                    kind: Sequence[str] = (), allow_other: bool = False, remedy: str = "") -> str | None:
    """None when `artefact` (its record of what it was made from: `recorded`) was made from the
    model `used_with` (its facts: `actual`). UserError when it cannot work with it (a `kind` field
    differs) or, unless `allow_other`, was made from another model; with `allow_other`, the note
    that says so. `remedy`: what to do instead, for the message."""
    wrong_kind = differences(recorded, actual, kind)
    if wrong_kind:
        raise UserError(f"{artefact}: made for a model with {describe(recorded, wrong_kind)}, but {used_with} has "
                        f"{describe(actual, wrong_kind)}: it cannot work with it{'; ' + remedy if remedy else ''}")
    if not differences(recorded, actual, ("sha256",)):
        return None
    made_from = f"{recorded['sha256'][:12]}" + (f", step {recorded['step']}" if "step" in recorded else "")
    used = f"{actual['sha256'][:12]}" + (f", step {actual['step']}" if "step" in actual else "")
    if not allow_other:
        raise UserError(f"{artefact}: made from another model ({made_from}), not {used_with} ({used})"
                        f"{'; ' + remedy if remedy else ''}; or pass {ALLOW_FLAG} to use it all the same")
    return f"{artefact} was made from another model ({made_from}), not {used_with} ({used}): played with {ALLOW_FLAG}"
