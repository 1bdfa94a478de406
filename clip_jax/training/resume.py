"""What a resumed run may change: the one rule, and its table.

Every checkpoint holds the run's record (`{"model", "tokenizer", "training"}`, the config as it was).
Before a checkpoint's state is restored, `check_resume` compares each setting the checkpoint
depends on with that record. A changed setting is either honoured (the run goes on with the new
value, and says so in one line) or refused (ResumeRefused: one line naming the setting, the
checkpoint's value and the new one, and what to do). A changed setting is never taken for a
damaged checkpoint, and never passes in silence. Settings the table does not name (total_steps,
logging, evaluation, checkpoint intervals, the data) change freely: a resumed run is often meant
to run longer or log differently, and the data iterator says itself when it cannot continue its
order exactly (docs/data.md).

A refused setting is one the restored state cannot follow: the tokenizer (the text tower's shapes
and every token depend on it, and it was trained or copied once into the workdir; its files there
are compared with the digests in the record, so a replaced SentencePiece model is refused too), what the
optimizer state is built from (frozen parameters have no moments; clipping on or off changes the
state's structure), the objective, the model's identity (`checkpointing.check_same_model`) and the
values that only a fresh run reads (initial values, `init.*`). Everything else in the table
(learning-rate settings, the loss's implementation and weights, batch size, mesh, compute dtype,
the moving average) is honoured from the first resumed step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from clip_jax.training import checkpointing
from clip_jax.training.run_tokenizer import tokenizer_files_digest

HONOUR, REFUSE = "honour", "refuse"

# What a refusal suggests instead.
_NEW_RUN = "set it back, or train a new --workdir from this one with --config.init.checkpoint=<this workdir>"


class ResumeRefused(ValueError):
    """A setting changed in a way the checkpoint cannot follow; the message is the one line."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a change of `setting` (a config field, or a group of them: "tokenizer" covers
    tokenizer.*) does on resume. `when(old, new)` narrows the rule to some changes (None: all);
    `why` is said with the change (None: the change is said where it is applied)."""

    setting: str
    action: str
    why: str | None
    when: Callable[[Any, Any], bool] | None = None

    def covers(self, key: str, old: Any, new: Any) -> bool:
        named = key == self.setting or key.startswith(self.setting + ".")
        return named and (self.when is None or self.when(old, new))


def _on_off_changes(old: Any, new: Any) -> bool:
    return bool(old) != bool(new)


# The table: the first rule that covers a changed field decides. Fields no rule covers change freely.
RULES: tuple[Rule, ...] = (
    Rule(
        "tokenizer",
        REFUSE,
        "a resumed run keeps the tokenizer saved in its workdir: the text tower's "
        "shapes and every token depend on it; set it back, or use a new --workdir",
    ),
    Rule(
        "optimizer.freeze_regex",
        REFUSE,
        f"the optimizer state holds moments only for the parameters it trains; {_NEW_RUN}",
    ),
    Rule(
        "optimizer.grad_clip_norm",
        REFUSE,
        f"turning clipping on or off changes the optimizer state; another value above 0 would be honoured; {_NEW_RUN}",
        when=_on_off_changes,
    ),
    Rule("optimizer", HONOUR, "applied from the next step"),
    Rule("loss.name", REFUSE, f"the checkpoint was trained for its objective; {_NEW_RUN}"),
    Rule("loss", HONOUR, "applied from the next step"),
    # Initial values: the checkpoint holds the learned values, so a new one would be ignored.
    Rule(
        "model.overrides.logit_bias_init", REFUSE, f"an initial value; the checkpoint holds the learned one; {_NEW_RUN}"
    ),
    Rule(
        "model.overrides.logit_scale_init",
        REFUSE,
        f"an initial value; the checkpoint holds the learned one; {_NEW_RUN}",
    ),
    Rule("init", REFUSE, f"only a fresh run loads init.*; the checkpoint's parameters are restored; {_NEW_RUN}"),
    # The model's identity (parameter shapes, layout, function) was refused by check_same_model;
    # what is left leaves the parameters as they are (compute dtype, remat, attention kernel, FLIP).
    Rule("model", HONOUR, "the parameters are restored as they are"),
    # The moving average is started or dropped by setup, which says so (clip_jax.training.setup).
    Rule("ema.decay", HONOUR, None, when=_on_off_changes),
    Rule("ema", HONOUR, "applied from the next step"),
    Rule("global_batch_size", HONOUR, "the data continues at its position when its order allows (docs/data.md)"),
    Rule("accumulation_steps", HONOUR, "the same gradient in more or fewer micro-batches"),
    Rule("train_batch_norm", HONOUR, "applied from the next step"),
    Rule("mesh", HONOUR, "the checkpoint is read into the new mesh's layout"),
)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def rule_for(key: str, old: Any, new: Any) -> Rule | None:
    """The rule of a change of config field `key` from `old` to `new`; None: it changes freely."""
    return next((rule for rule in RULES if rule.covers(key, old, new)), None)


def _replaced_tokenizer_files(record: dict[str, Any], workdir: str, step: int) -> list[str]:
    """A refusal for each tokenizer file of the workdir (e.g. the SentencePiece model) that is not
    the one the checkpoint was trained with; none for records written before files were digested."""
    recorded = record.get("tokenizer_files")
    if not isinstance(recorded, dict) or not isinstance(record.get("tokenizer"), dict):
        return []
    now = tokenizer_files_digest(record["tokenizer"], workdir)
    return [
        f"the tokenizer file {name} has SHA-256 {digest[:12]}... in the checkpoint of step {step} and "
        f"{now.get(name, 'none')[:12]}... now: put the run's own file back, or use a new --workdir"
        for name, digest in sorted(recorded.items())
        if now.get(name) != digest
    ]


def check_resume(
    record: dict[str, Any], training: dict[str, Any], model: dict[str, Any], workdir: str, step: int
) -> list[str]:
    """Compare the run's settings (`training`: its config record; `model`: the model config it would train,
    with the checkpoint's tokenizer) with checkpoint `step`'s run `record`, before its state is
    restored. Raises ResumeRefused (one line, every refused setting named with both values) or
    `check_same_model`'s ValueError; returns the lines that announce the honoured changes.

    The tokenizer's files in `workdir` are compared with the digests the record holds (a replaced
    SentencePiece model). Fields that only one side has (records written before a field existed)
    are not compared.
    """
    stored = record.get("training")
    honoured: list[str] = []
    refused: list[str] = []
    if isinstance(stored, dict):
        old, new = _flat(stored), _flat(training)
        for key in sorted(set(old) & set(new)):
            if old[key] == new[key]:
                continue
            rule = rule_for(key, old[key], new[key])
            if rule is None or rule.why is None:
                continue
            change = f"{key} is {old[key]!r} in the checkpoint of step {step} and {new[key]!r} now"
            (refused if rule.action == REFUSE else honoured).append(f"{change}: {rule.why}")
    refused.extend(_replaced_tokenizer_files(record, workdir, step))
    if refused:
        raise ResumeRefused(f"cannot resume {workdir!r} with changed settings: {'; '.join(refused)}")
    checkpointing.check_same_model(record["model"], model, workdir)
    return [f"Resuming with a changed setting: {line}" for line in honoured]
