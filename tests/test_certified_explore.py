"""Certified mixed precision: genome boxes contain the real fake-quantised network; NSGA-II with a
certified objective (budget: ~25 s, most of it training and calibrating digits-mlp once)."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from qlib import bounds, milp, models, zoo
from qlib.bounds.memo import IntervalMemo, remember_intervals
from qlib.explore import certify, context, fakequant, run
from qlib.explore import workload as wl
from qlib.explore.store import Store

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "workloads" / "digits_tiny.yaml"
CERTIFIED = {"certified": {"kind": "discrepancy", "method": "crown-ibp", "samples": 32}}


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> wl.Workload:
    root = tmp_path_factory.mktemp("certified")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QLIB_CACHE", str(root / "cache"))
        net = zoo.get("digits-mlp", epochs=30, progress=False)
    checkpoint = models.save(net, root / "digits-mlp.pt")
    w = wl.override(wl.load(TINY), CERTIFIED)
    return w.model_copy(update={"model": w.model.model_copy(update={"checkpoint": checkpoint})})


@pytest.fixture(scope="module")
def prepared(workload) -> context.Prepared:
    return context.prepare(workload)


def test_quantizer_clip_contains_modelopt_outputs(prepared):
    """Every output of a real ModelOpt input quantiser lies within ``radius`` of ``min(x, clip)``,
    also far above the calibrated range, where the clip is what moves the value."""
    q = prepared.evaluator.net
    m = dict(q.model.named_modules())[q.layers[1]]
    amax = float(m.input_quantizer.amax)
    x = torch.linspace(0, 3 * amax, 20001).reshape(1, -1)
    for bits in (2, 3, 5, 8, 12, 16):
        m.input_quantizer.num_bits = bits
        with torch.no_grad():
            out = m.input_quantizer(x).double()
        clip, radius = certify.quantizer_clip(amax, bits)
        assert ((out - torch.clamp(x.double(), max=clip)).abs() <= radius).all(), bits
        assert (out.max() <= clip + radius) and ((x.double() - out).max() > 1.5 * amax)
    assert certify.quantizer_clip(0.0, 8) == (0.0, 0.0)


def test_genome_box_contains_the_fake_quantised_logits(prepared):
    ev = prepared.evaluator
    X = ev.X
    gen = torch.Generator().manual_seed(14)
    genomes = [torch.randint(2, 9, (6,), generator=gen).tolist() for _ in range(6)] + [[16] * 6]
    for genome in genomes:
        box = ev.box(genome)
        with torch.no_grad(), ev.net.frozen_weights():
            z = ev.net.model(X).double()
        for method, options, dtype in (
            ("ibp", None, torch.float64),
            ("crown-ibp", None, torch.float64),
            ("crown-ibp", bounds.CrownIbpOptions(stop=1), torch.float32),  # the Fashion workload's
        ):
            lower, upper = bounds.logit_bounds(
                ev.float_model, X, box, method, options=options, dtype=dtype
            )
            assert bool(((lower <= z) & (z <= upper)).all()), (genome, method, options)
            # The certified objective's own bound: the true-class probability, via the margins.
            p = bounds.probability_bounds(
                ev.float_model, X, ev.y, box, method, options=options, dtype=dtype
            )
            pz = torch.softmax(z, 1).gather(1, ev.y[:, None].long())[:, 0]
            assert bool(((p.lower <= pz) & (pz <= p.upper)).all()), (genome, method, options)
    # 16 bits everywhere: the box is tight, the certificate useful.
    assert (upper - lower).max() < 0.05
    stop1 = certify.Certifier(ev.certifier.X, ev.certifier.y, "crown-ibp", stop=1)
    assert 0 <= stop1(ev.float_model, box).value < 0.01


def test_genome_box_is_remembered_per_layer_and_sees_weight_changes(prepared):
    ev = prepared.evaluator
    first = ev.box([9] * 6)
    certify._LAYER_BOXES.clear()
    assert ev.box([9] * 6) == first  # remembered parts equal a fresh computation
    assert ev.box([9] * 6) == first
    net = copy.deepcopy(ev.net)
    with torch.no_grad():
        dict(net.model.named_modules())[net.layers[0]].weight.mul_(1.5)
    assert certify.genome_box(net, [9] * 6).eps_weight[0] != first.eps_weight[0]
    # Through ``.data`` (the version counter, storage and identity stay): as a fresh copy.
    changed = certify.genome_box(net, [9] * 6)
    dict(net.model.named_modules())[net.layers[0]].weight.data.mul_(1.25)
    now = certify.genome_box(net, [9] * 6)
    assert now != changed and now == certify.genome_box(copy.deepcopy(net), [9] * 6)


def test_milp_bounds_a_genome_box(prepared):
    """The exact MILP takes a genome's box (clips included): its bounds contain the real
    fake-quantised logits and lie within CROWN's."""
    ev = prepared.evaluator
    box = ev.box([10, 12, 9, 11, 12, 10])
    x = ev.X[:2]
    res = milp.logit_bounds(ev.float_model, x, box, time_limit=20)
    with torch.no_grad(), ev.net.frozen_weights():
        z = ev.net.model(x).double()
    assert bool(((res.lower <= z) & (z <= res.upper)).all())
    lo, hi = bounds.logit_bounds(ev.float_model, x, box, "crown")
    assert (res.lower >= lo - 1e-6).all() and (res.upper <= hi + 1e-6).all()


def test_cnn_genome_box_contains_the_fake_quantised_logits():
    """Convolutions too (sound, not exact: the bounds let each position pick its weight error)."""
    net = models.cnn([1, 8, 8], 10, channels=(3, 4), hidden=6, seed=5).eval()
    gen = torch.Generator().manual_seed(5)
    X = torch.rand(48, 1, 8, 8, generator=gen) ** 2
    q = fakequant.quantize(net, X[:32], method="percentile")
    for _ in range(4):
        genome = torch.randint(2, 17, (q.n_genes,), generator=gen).tolist()
        box = certify.genome_box(q, genome)
        with torch.no_grad(), q.frozen_weights():
            z = q.model(X).double()
        lower, upper = bounds.logit_bounds(net, X, box, "crown-ibp")
        assert bool(((lower <= z) & (z <= upper)).all()), genome


def test_certified_objective_stored_and_resumed(prepared, workload, tmp_path):
    path = tmp_path / "certified.sqlite"
    with Store(path, workload.digest(), workload.name) as store:
        ex = run.explore(prepared, store)
        recs = store.records()
        assert ex.evaluated == len(recs) > 0
        assert all(len(r.objectives) == 3 for r in recs)
        assert {r.status for r in recs} <= {"certified", "uncertifiable"}
        front = run.pareto_front(store, objectives=(0, 1))
        assert front and all(len(r.objectives) == 3 for r in front)
        F = np.array([r.objectives for r in recs])
        with pytest.raises(ValueError, match="two objectives"):
            run.hypervolume(F, prepared)
        assert run.hypervolume(F[:, :2], prepared) >= 0
    with Store(path, workload.digest(), workload.name) as store:  # a rerun evaluates nothing
        assert run.explore(prepared, store).evaluated == 0
        assert store.records() == recs
    plain = wl.load(TINY)
    assert plain.digest() != workload.digest()
    assert "certified" not in plain.model_dump(exclude_none=True)


def test_certified_digest_follows_the_certificate_code(workload, monkeypatch):
    """A fix to the bounds changes a certified workload's digest, so a rerun computes its
    certificates again instead of resuming older values; other workloads keep theirs."""
    plain = wl.load(TINY)
    before, plain_before = workload.digest(), plain.digest()
    assert wl.certificate_code() == wl.certificate_code()  # stable
    monkeypatch.setattr(wl, "certificate_code", lambda: "changed")
    assert workload.digest() != before
    assert plain.digest() == plain_before


def test_vacuous_box_is_uncertifiable_not_an_error(prepared):
    ev = prepared.evaluator
    cert = ev.certify([2] * 6)
    assert cert.status == "uncertifiable" and cert.value == 1.0
    good = ev.certify([16] * 6)
    assert good.status == "certified" and 0 <= good.value < 0.01
    acc = certify.Certifier(ev.certifier.X, ev.certifier.y, "crown-ibp", "accuracy")
    assert acc(ev.float_model, ev.box([2] * 6)).status == "uncertifiable"
    high = acc(ev.float_model, ev.box([16] * 6))
    assert high.status == "certified" and high.value == -high.verified < -0.5
    c32 = certify.Certifier(ev.certifier.X, ev.certifier.y, "crown-ibp", dtype="float32")
    loose = c32(ev.float_model, ev.box([16] * 6))  # as rigorous, slightly looser
    assert loose.status == "certified" and good.value - 1e-12 <= loose.value < 0.01


def test_certifier_reuses_the_nominal_logits_until_the_weights_change(prepared):
    """The float logits do not depend on the genome: computed once, identical to a fresh
    computation, recomputed when a weight changes, and never pickled."""
    ev = prepared.evaluator
    cert = certify.Certifier(ev.certifier.X, ev.certifier.y, "ibp")
    model = copy.deepcopy(ev.float_model)
    first = cert.nominal(model)
    assert cert.nominal(model) is first
    assert torch.equal(first, bounds.float_logits(model, cert.X))
    box = ev.box([10] * 6)
    with remember_intervals(IntervalMemo()), torch.no_grad():  # as a certifier bounds
        p = bounds.probability_bounds(model, cert.X, cert.y, box, "ibp")
    p0 = torch.softmax(first, 1).gather(1, cert.y[:, None].long())[:, 0]
    fresh = torch.maximum(p.upper - p0, p0 - p.lower).mean().item()
    assert cert(model, box).value == pytest.approx(fresh, abs=1e-15)
    # Through the margins: never looser than the logit intervals' discrepancy.
    lo, hi = bounds.logit_bounds(model, cert.X, box, "ibp")
    hot = torch.nn.functional.one_hot(cert.y.long(), 10).bool()
    y = cert.y[:, None].long()
    best = torch.softmax(torch.where(hot, hi, lo), 1).gather(1, y)[:, 0]
    worst = torch.softmax(torch.where(hot, lo, hi), 1).gather(1, y)[:, 0]
    assert fresh <= torch.maximum(best - p0, p0 - worst).mean() + 1e-12
    with torch.no_grad():
        model[1].bias.add_(0.5)
    second = cert.nominal(model)
    assert not torch.equal(second, first)
    model[1].bias.data.add_(0.5)  # keeps the version counter: the values are compared
    assert torch.equal(cert.nominal(model), bounds.float_logits(model, cert.X))
    assert not torch.equal(cert.nominal(model), second)
    assert pickle.loads(pickle.dumps(cert))._nominal is None
    with pytest.raises(ValueError, match=r"logits must have shape \(32, 10\)"):
        bounds.worst_case_discrepancy(model, cert.X, cert.y, box, logits=first[:, :3])


def test_bounds_after_a_certificate_run_outside_inference_mode(prepared):
    """A certificate runs in inference mode and leaves inference tensors in the caches of the
    model it bounds (converted weights, value snapshots). Ordinary bounds on that model
    afterwards, in both formats and with gradients, must work and equal those of a model that
    never met a certifier."""
    ev = prepared.evaluator
    net, fresh = copy.deepcopy(ev.float_model), copy.deepcopy(ev.float_model)
    box = ev.box([10] * 6)
    cert = certify.Certifier(ev.certifier.X, ev.certifier.y, "crown-ibp", dtype="float32")
    assert cert(net, box).status == "certified"
    assert not cert.nominal(net).is_inference()
    X = cert.X[:8]
    for dtype in (torch.float32, torch.float64):
        for method in ("ibp", "crown-ibp", "crown"):
            lo, hi = bounds.logit_bounds(net, X, box, method, dtype=dtype)
            ref = bounds.logit_bounds(fresh, X, box, method, dtype=dtype)
            assert not lo.is_inference()
            assert torch.equal(lo, ref[0]) and torch.equal(hi, ref[1]), (method, dtype)
    for p in net.parameters():
        p.requires_grad_(True)
    lo, hi = bounds.logit_bounds(net, X.double(), box, "crown-ibp", differentiable=True)
    (hi - lo).sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in net.parameters())


def test_errors_name_the_layer_key_or_method(prepared, workload):
    ev = prepared.evaluator
    with pytest.raises(certify.CertifyError, match="layers: conv"):
        context.certifier(workload.model_copy(update={"layers": "conv"}), prepared.model, {})
    with pytest.raises(certify.CertifyError, match=r"no calibrated input range for layers \['1'"):
        context.certifier(workload, prepared.model, {})
    tanh = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.Tanh(), nn.Linear(4, 10))
    with pytest.raises(certify.CertifyError, match=r"'ibp' cannot bound .*layer 2 \(Tanh\)"):
        certify.check_certifiable(tanh, (1, 8, 8), "ibp")
    with pytest.raises(certify.CertifyError, match="dtype must be 'float64' or 'float32'"):
        certify.Certifier(ev.X, ev.y, "ibp", dtype="float16")
    with pytest.raises(certify.CertifyError, match="unknown bound method 'milp'"):
        certify.Certifier(ev.X, ev.y, "milp")
    with pytest.raises(certify.CertifyError, match="stop=1 applies to method 'crown-ibp' only"):
        certify.Certifier(ev.X, ev.y, "ibp", stop=1)
    with pytest.raises(wl.WorkloadError, match="certified: stop applies to method crown-ibp"):
        wl.override(workload, {"certified": {"method": "crown", "stop": 1}})
    with pytest.raises(ValueError, match=r"CrownIbpOptions.stop must be in \[-3, 3\)"):
        certify.Certifier(ev.X, ev.y, "crown-ibp", stop=3)(ev.float_model, ev.box([8] * 6))
    with pytest.raises(wl.WorkloadError, match="certified.method: unknown bound method"):
        wl.override(workload, {"certified": {"method": "exact"}})
    partial = fakequant.QuantNet(ev.net.model, ev.net.layers[:2])  # the last layer left float
    with pytest.raises(certify.CertifyError, match=r"layers \['5'\] are not quantised"):
        certify.genome_box(partial, [8] * 4)
    with pytest.raises(ValueError, match="no certified objective"):
        context.Evaluator(**{**vars(ev), "certifier": None, "_net": None}).certify([8] * 6)
