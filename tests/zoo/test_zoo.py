"""The conformance zoo: counting, setup, revival and initializers on real torchvision, timm and transformers models.

Every model is built with random weights (``tests/zoo/models.py``); a few units at several places are forced dead by
shifting their bias far negative (``tests/zoo/oracle.py``, from a recorded forward, independent of the package's
structure code). Each check compares the package with values computed here:

- ``count``: :class:`~lightning_relu.DeadUnitTracker` reports, for every place where the dispatcher saw a rectifier
  run, one site with exactly the same per-unit active counts and entries (so the same dead mask), and no other site;
- ``setup``: building a tracker and one observed forward leave every parameter, buffer and the RNG byte for byte as the
  same forward without a tracker does;
- ``revive_output``: :func:`~lightning_relu.revive_dead_units_` revives at least one unit and keeps the eval-mode
  output (relative change at most 1e-5);
- ``revive_fire``: on another batch, in train mode, at least 99% of the revived units are active;
- ``rai``: :func:`~lightning_relu.rai_` changes the weights of at least one producer (an affine operation whose output
  reaches a rectifier, found at the dispatcher level) and keeps outputs finite;
- ``compact``: :func:`~lightning_relu.compact` leaves the model untouched and returns a model whose eval-mode output
  equals the original's (relative change at most 1e-5); every site whose dead units stay is named with a reason;
- ``sign_flip``: with one site made to kill every sample (all its units' bias far negative),
  :func:`~lightning_relu.sign_flip_` runs, negates the map feeding that site (its bias turns positive), changes only
  signs of parameters, no buffer, no module's mode, and keeps outputs finite.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest

pytest.importorskip("torchvision", reason="the zoo runs in its own environment: `make zoo` (.venv-zoo)")
pytest.importorskip("timm")
pytest.importorskip("transformers")

import torch
from torch import Tensor

import lightning_relu
from tests.zoo import checks
from tests.zoo.models import MODELS, ZooModel, call, like, output_tensor
from tests.zoo.oracle import Kill

PARAMS = [pytest.param(entry, id=entry.name, marks=[pytest.mark.zoo_fast] if entry.fast else []) for entry in MODELS]

REL_TOL = 1e-5  # revival keeps the output: max |after - before| <= REL_TOL * max |before|
FIRE_SHARE = 0.99  # revived units active on the next batch


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _finite_outputs(model: torch.nn.Module, example: Any) -> list[str]:
    """The modes in which the model's output is not finite."""
    problems = []
    training = model.training
    for mode in (False, True):
        model.train(mode)
        torch.manual_seed(checks.SEED)
        with torch.no_grad():
            out = output_tensor(call(model, example))
        if not bool(torch.isfinite(out).all()):
            problems.append("train" if mode else "eval")
    model.train(training)
    return problems


# ------------------------------------------------------------------------------------------------------ counting
@pytest.mark.zoo_check("count")
@pytest.mark.parametrize("entry", PARAMS)
def test_counts_equal_dispatcher_ground_truth(entry: ZooModel, record_property: Any) -> None:
    model, example, kills = checks.forced(entry)
    assert kills, f"{entry.name}: found no rectifier fed cleanly by a producer to force dead units at"
    places = checks.oracle_places(checks.copy_model(model), example)
    # the forcing worked: the forced units are dead in the ground truth
    by_key = {place.key: place for place in places}
    for kill in kills:
        place = by_key[kill.place]
        assert bool(place.dead[list(kill.units)].all()), f"forcing {kill} left units alive"
    report = checks.tracked(model, example)
    problems = checks.compare_counts(places, report)
    # and the sites are the places by key: the tracker numbers call positions as the site key says
    problems += checks.compare_keys(places, report, checks.site_keys(model, example))
    dead = sum(int(place.dead.sum()) for place in places)
    record_property("detail", f"{len(places)} sites, {dead} dead units")
    assert not problems, f"{len(problems)} mismatch(es): " + "; ".join(problems[:6])


@pytest.mark.zoo_check("setup")
@pytest.mark.parametrize("entry", PARAMS)
def test_setup_and_forward_leave_state_untouched(entry: ZooModel) -> None:
    model, example, _ = checks.forced(entry)
    reference = checks.copy_model(model)
    before = checks.snapshot(model)
    modes = [m.training for m in model.modules()]

    torch.manual_seed(checks.SEED)
    rng = torch.get_rng_state()
    tracker = lightning_relu.DeadUnitTracker(model)
    tracker.attach()
    changed = checks.byte_differences(before, checks.snapshot(model))
    assert changed == [], f"setting up a tracker changed {len(changed)} tensors: {changed[:4]}"
    assert torch.equal(torch.get_rng_state(), rng), "setting up a tracker drew from the global RNG"
    try:
        out = output_tensor(call(model, example)).detach()
    finally:
        tracker.detach()
    rng_tracked = torch.get_rng_state()

    torch.manual_seed(checks.SEED)
    expected = output_tensor(call(reference, example)).detach()
    changed = checks.byte_differences(checks.snapshot(reference), checks.snapshot(model))
    assert changed == [], f"parameters/buffers differ from a forward without tracker: {changed[:8]}"
    assert torch.equal(torch.get_rng_state(), rng_tracked), "the RNG state differs from a forward without tracker"
    assert checks.same_bytes(out, expected), "the output differs from a forward without tracker"
    assert [m.training for m in model.modules()] == modes, "module modes changed"


# ------------------------------------------------------------------------------------------------------- revival
_REVIVALS: dict[str, dict[str, Any]] = {}  # by model: what the two revival checks share


def _revival(name: str, keep: bool = True) -> dict[str, Any]:
    """Force, measure one train-mode batch, revive with the held batch (computed once for the two revival checks)."""
    result = _REVIVALS.get(name) if keep else _REVIVALS.pop(name, None)
    if result is not None:
        return result
    entry = next(e for e in MODELS if e.name == name)
    model, example, _ = checks.forced(entry)
    report = checks.tracked(model, example)
    before = checks.eval_output(model, example)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        revived = lightning_relu.revive_dead_units_(model, report, generator=_generator(), example_input=example)
    for warning in caught:  # shown in the run's warnings summary as usual
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    said = [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, lightning_relu.RevivalWarning)]
    after = checks.eval_output(model, example)
    result = dict(model=model, example=example, report=report, revived=revived, before=before, after=after, said=said)
    if keep:
        _REVIVALS[name] = result
    return result


def _assert_refused(result: dict[str, Any], dead: int, record_property: Any) -> None:
    """No unit was revived: that is a result only when every site with dead units is named in a RevivalWarning
    with its reason (a model whose consumers standardise their weights cannot hide a fresh unit, say)."""
    said: list[str] = result["said"]
    dead_sites = [name for name, layer in result["report"].items() if int(layer.num_dead)]
    assert dead_sites, "no dead unit to revive: the forcing did not work"
    unnamed = [name for name in dead_sites if not any(f"'{name}'" in message for message in said)]
    first = f"; {len(said)} warning(s), first: {said[0]}" if said else "; no warning"
    assert not unnamed, f"no unit revived ({dead} dead units reported{first}); sites not named: {unnamed[:4]}"
    record_property("detail", f"refused, every site named: {said[0]}")


@pytest.mark.zoo_check("revive_output")
@pytest.mark.parametrize("entry", PARAMS)
def test_revival_keeps_output(entry: ZooModel, record_property: Any) -> None:
    result = _revival(entry.name)
    revived: dict[str, int] = result["revived"]
    total = sum(revived.values())
    dead = sum(int(layer.num_dead) for layer in result["report"].values())
    record_property("detail", f"{total} of {dead} dead units revived")
    if total == 0:
        _assert_refused(result, dead, record_property)
    before: Tensor = result["before"]
    after: Tensor = result["after"]
    assert bool(torch.isfinite(after).all()), "the output is not finite after revival"
    change = checks.relative_change(after, before)
    assert change <= REL_TOL, f"revival changed the eval-mode output by {change:.3g} (relative, max {REL_TOL})"


@pytest.mark.zoo_check("revive_fire")
@pytest.mark.parametrize("entry", PARAMS)
def test_revived_units_fire(entry: ZooModel, record_property: Any) -> None:
    result = _revival(entry.name, keep=False)  # the last user: the model is changed below, and memory freed
    revived: dict[str, int] = {name: count for name, count in result["revived"].items() if count > 0}
    if not revived:  # nothing to fire: the refusal must name every site and why (checked as in revive_output)
        _assert_refused(result, sum(int(layer.num_dead) for layer in result["report"].values()), record_property)
        return
    model = result["model"]
    model.train()
    batch = like(result["example"], seed=7)
    fresh = checks.tracked(model, batch, seed=1)
    total = still_dead = 0
    worst = []
    for name, count in revived.items():
        was_dead = result["report"][name].dead.bool()
        now_dead = fresh[name].dead.bool() & was_dead
        # the units a site did not revive keep their forced bias and stay dead: what else is dead was revived
        unrevived = int(was_dead.sum()) - count
        dead_revived = min(count, max(0, int(now_dead.sum()) - unrevived))
        total += count
        still_dead += dead_revived
        if dead_revived:
            worst.append((dead_revived, name, count))
    share = (total - still_dead) / total
    record_property("detail", f"{total - still_dead} of {total} revived units fire")
    worst.sort(reverse=True)
    detail = ", ".join(f"{name}: {dead}/{count}" for dead, name, count in worst[:4])
    assert share >= FIRE_SHARE, f"{still_dead} of {total} revived units dead on the next batch ({detail})"


# ---------------------------------------------------------------------------------------------------- compaction
@pytest.mark.zoo_check("compact")
@pytest.mark.parametrize("entry", PARAMS)
def test_compact_keeps_output(entry: ZooModel, record_property: Any) -> None:
    model, example, _ = checks.forced(entry)
    report = checks.tracked(model, example)
    before = checks.eval_output(model, example)
    state = checks.snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = lightning_relu.compact(model, report, example)
    changed = checks.byte_differences(state, checks.snapshot(model))
    assert changed == [], f"compact changed the input model: {changed[:4]}"
    dead = sum(int(layer.num_dead) for layer in report.values())
    assert dead, "no dead unit to remove: the forcing did not work"
    unexplained = [s.name for s in result.sites.values() if s.kept and not s.reason]
    assert not unexplained, f"dead units kept without a reason at {unexplained[:4]}"
    small, large = checks.parameter_count(result.model), checks.parameter_count(model)
    first = next((f"{s.name}: {s.reason}" for s in result.sites.values() if s.kept), "")
    record_property(
        "detail",
        f"{result.removed} of {dead} dead units removed, parameters {large} -> {small}"
        + (f"; kept e.g. {first[:160]}" if first else ""),
    )
    after = checks.eval_output(result.model, example)
    assert after.shape == before.shape, f"output shape {tuple(after.shape)} != {tuple(before.shape)}"
    change = checks.relative_change(after, before)
    assert change <= REL_TOL, f"compaction changed the eval-mode output by {change:.3g} (relative, max {REL_TOL})"
    assert small <= large


# -------------------------------------------------------------------------------------------------- initializers
@pytest.mark.zoo_check("rai")
@pytest.mark.parametrize("entry", PARAMS)
def test_rai_acts_and_keeps_outputs_finite(entry: ZooModel, record_property: Any) -> None:
    model, example = entry.build()
    producers = checks.producer_weights(entry.name)
    assert producers, "no producer found at the dispatcher level"
    before = checks.snapshot(model)
    lightning_relu.rai_(model, generator=_generator(), example_input=example)
    after = checks.snapshot(model)
    acted = [
        place
        for place, weights in producers.items()
        if any(not checks.same_bytes(before[f"param:{w}"], after[f"param:{w}"]) for w in weights)
    ]
    record_property("detail", f"{len(acted)} of {len(producers)} producers drawn")
    assert acted, f"rai_ changed none of the {len(producers)} producers' weights"
    assert not (bad := _finite_outputs(model, example)), f"non-finite output after rai_ in {bad} mode"


def _sign_flip_batches(example: Any) -> tuple[list[Any], Any]:
    """``data`` and ``input_fn`` for ``sign_flip_``: the example itself, a tensor or a dict of model arguments.

    A transformers model whose only data argument is ``input_ids`` takes it positionally; a model that needs
    more keyword arguments (T5's ``decoder_input_ids``) gets the dict as its batch.
    """
    if isinstance(example, dict) and set(example) <= {"input_ids", "attention_mask"}:
        return [example], lambda batch: batch["input_ids"]
    return [example], None


def _killed_site(entry: ZooModel) -> Kill | None:
    """Every unit of one planned place (the middle one) shifted far negative: a site that kills every sample."""
    shifts = [kill for kill in checks.kill_plan(entry.name) if kill.how == "shift"]
    if not shifts:
        return None
    kill = shifts[len(shifts) // 2]
    return Kill(kill.place, kill.param, (), "shift_all")


@pytest.mark.zoo_check("sign_flip")
@pytest.mark.parametrize("entry", PARAMS)
def test_sign_flip_changes_only_signs(entry: ZooModel, record_property: Any) -> None:
    model, example = entry.build()
    killed = _killed_site(entry)
    if killed is not None:  # a site that kills every sample: the pass must negate the map feeding it
        with torch.no_grad():
            dict(model.named_parameters())[killed.param].fill_(-1e4)
    before = checks.snapshot(model)
    modes = [m.training for m in model.modules()]
    data, input_fn = _sign_flip_batches(example)
    reports = lightning_relu.sign_flip_(model, data, input_fn=input_fn)
    after = checks.snapshot(model)
    buffers = [n for n in checks.byte_differences(before, after) if n.startswith("buffer:")]
    assert buffers == [], f"sign_flip_ changed buffers {buffers[:6]}"
    not_signs = [
        n
        for n in before
        if n.startswith("param:") and not checks.same_bytes(before[n].abs(), after[n].abs())
    ]
    assert not_signs == [], f"sign_flip_ changed magnitudes of {not_signs[:6]}"
    assert [m.training for m in model.modules()] == modes, "sign_flip_ changed module modes"
    flipped = sum(1 for n in before if n.startswith("param:") and not checks.same_bytes(before[n], after[n]))
    survival = min((r.survival for r in reports.values()), default=math.nan)
    what = "no bias to kill a site with" if killed is None else f"site fed by {killed.param} killed every sample"
    summary = f"{len(reports)} sites, {flipped} parameters flipped, min survival {survival:.2f}"
    record_property("detail", f"{summary}; {what}")
    if killed is not None:
        assert bool((after[f"param:{killed.param}"] > 0).all()), (
            f"sign_flip_ left {killed.param} negative: the site it feeds still kills every sample"
        )
    assert not (bad := _finite_outputs(model, example)), f"non-finite output after sign_flip_ in {bad} mode"
