"""Exploration: fake quantisation, caching, resume, store, weather and traffic models."""

import dataclasses
import sqlite3
from pathlib import Path

import pytest
import torch

from qlib import data, models, zoo
from qlib.explore import context, fakequant, finetune, run, traffic, weather
from qlib.explore import workload as wl
from qlib.explore.store import Record, Store, StoreError, StoreMismatch

TINY = Path(__file__).resolve().parents[1] / "workloads" / "digits_tiny.yaml"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """digits-mlp trained once for this module (the per-test cache would retrain it each time)."""
    root = tmp_path_factory.mktemp("explore")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QLIB_CACHE", str(root / "cache"))
        net = zoo.get("digits-mlp", epochs=30, progress=False)
    return models.save(net, root / "digits-mlp.pt")


@pytest.fixture(scope="module")
def workload(checkpoint) -> wl.Workload:
    w = wl.load(TINY)
    return w.model_copy(update={"model": w.model.model_copy(update={"checkpoint": checkpoint})})


@pytest.fixture(scope="module")
def prepared(workload) -> context.Prepared:
    return context.prepare(workload)


class Counting:
    """Wraps an evaluator; counts calls per genome and can raise Ctrl-C after ``stop_after``."""

    def __init__(self, inner, stop_after: int | None = None):
        self.inner, self.stop_after, self.calls = inner, stop_after, []

    def __getattr__(self, name):  # input_amax etc. come from the wrapped evaluator
        return getattr(self.inner, name)

    def __call__(self, genome):
        if self.stop_after is not None and len(self.calls) == self.stop_after:
            raise KeyboardInterrupt
        self.calls.append(tuple(genome))
        return self.inner(genome)


def _with(prepared, evaluator):
    return dataclasses.replace(prepared, evaluator=evaluator)


def test_fake_quant_16_bits_matches_float_and_2_bits_degrades(prepared):
    X, y = prepared.evaluator.X, prepared.evaluator.y
    float_acc = models.evaluate(prepared.model, (X, y))
    q = fakequant.quantize(prepared.model, X, method="percentile")
    assert len(q.layers) == 3  # three Linear layers, each with an input and a weight quantiser
    q.set_bits([16] * q.n_genes)
    assert abs(models.evaluate(q.model, (X, y)) - float_acc) <= 1 / len(X)
    q.set_bits([2] * q.n_genes)
    low = models.predict(q.model, X)
    assert (low.argmax(1) == y).float().mean().item() < float_acc - 0.2
    with q.frozen_weights():  # weights quantised once give the same outputs
        assert torch.allclose(models.predict(q.model, X), low, atol=1e-5)
    assert torch.equal(models.predict(q.model, X), low)  # and the float weights are back
    with pytest.raises(ValueError, match="1 bit"):
        q.set_bits([1] * q.n_genes)


def _use_backend(q: fakequant.QuantNet, backend: str | None) -> None:
    mods = dict(q.model.named_modules())
    for name in q.layers:
        mods[name].input_quantizer.backend = backend
        mods[name].weight_quantizer.backend = backend


@pytest.mark.parametrize("pass_through", [True, False])
def test_inplace_backend_is_bit_identical_to_modelopt(pass_through):
    # The in-place backend must be a pure speed-up: ModelOpt's own CPU path (backend None) gives
    # the same outputs for every bit width and the same straight-through (or clipped) gradients.
    torch.manual_seed(0)
    net = models.cnn([1, 28, 28], 10, channels=(4, 8), hidden=16)
    X, y = data.load("fashion-mnist", "test", limit=128)
    q = fakequant.quantize(net, X, method="percentile")
    mods = dict(q.model.named_modules())
    for name in q.layers:
        for tq in (mods[name].input_quantizer, mods[name].weight_quantizer):
            assert tq.backend == fakequant.BACKEND
            tq._pass_through_bwd = pass_through
    for bits in [[b] * q.n_genes for b in range(2, 17)] + [[2, 16, 3, 9, 16, 2, 5, 7]]:
        q.set_bits(bits)
        results = []
        for backend in (fakequant.BACKEND, None):
            _use_backend(q, backend)
            q.model.zero_grad()
            out = q.model(X)
            nn_loss = torch.nn.functional.cross_entropy(out, y)
            nn_loss.backward()
            results.append((out.detach(), [p.grad.clone() for p in q.model.parameters()]))
        (out_a, grads_a), (out_b, grads_b) = results
        assert torch.equal(out_a, out_b), bits
        assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True)), bits


def test_conv_only_leaves_linear_layers_float():
    net = models.cnn([1, 28, 28], 10, channels=(4, 8), hidden=16)
    X, _ = data.load("fashion-mnist", "test", limit=64)
    q = fakequant.quantize(net, X, conv_only=True, method="max")
    assert q.layers == ["0", "2"]


def test_no_genome_evaluated_twice(prepared, tmp_path):
    counter = Counting(prepared.evaluator)
    with Store(tmp_path / "r.sqlite", prepared.workload.digest()) as store:
        ex = run.explore(_with(prepared, counter), store, generations=3)
        assert len(counter.calls) == len(set(counter.calls)) == len(store) == ex.evaluated
        # A second run replays the same seeded search entirely from the store.
        counter2 = Counting(prepared.evaluator)
        run.explore(_with(prepared, counter2), store, generations=3)
        assert counter2.calls == []


def test_resume_after_interrupt_loses_nothing(prepared, tmp_path):
    with Store(":memory:", prepared.workload.digest()) as ref:
        run.explore(prepared, ref)
        expected = {r.genome: r.accuracy for r in ref.records()}
    path = tmp_path / "r.sqlite"
    first = Counting(prepared.evaluator, stop_after=5)
    with Store(path, prepared.workload.digest()) as store, pytest.raises(KeyboardInterrupt):
        run.explore(_with(prepared, first), store)
    with Store(path, prepared.workload.digest()) as store:
        assert len(store) == 5  # every finished evaluation was committed
        second = Counting(prepared.evaluator)
        run.explore(_with(prepared, second), store)
        assert not set(second.calls) & set(first.calls)  # nothing evaluated again
        assert {r.genome: r.accuracy for r in store.records()} == expected


def test_pareto_front_until_a_generation_and_hypervolume(prepared, tmp_path):
    with Store(":memory:", prepared.workload.digest()) as store:
        run.explore(prepared, store, generations=3)
        records = store.records()
        for g in range(3):
            front = run.pareto_front(store, until_generation=g)
            assert front and all(r.generation <= g and r.constraint <= 0 for r in front)
            seen = [r for r in records if r.generation <= g and r.constraint <= 0]
            for r in front:  # nothing seen by then dominates a front member
                assert not any(
                    o.objectives[0] <= r.objectives[0]
                    and o.objectives[1] <= r.objectives[1]
                    and o.objectives != r.objectives
                    for o in seen
                )
        assert run.pareto_front(store, until_generation=2) == run.pareto_front(store)
        F = [r.objectives for r in records]
    hv = [run.hypervolume(F[:k], prepared) for k in range(1, len(F) + 1)]
    assert all(a <= b for a, b in zip(hv, hv[1:], strict=False))  # more points never shrink it
    assert 0 < hv[-1] <= 1 - prepared.min_accuracy
    one = [[-1.0, 0.0]]  # error-free at zero cost: the whole box
    assert run.hypervolume(one, prepared) == pytest.approx(1 - prepared.min_accuracy)
    infeasible = [[-(prepared.min_accuracy - 0.01), 0.0]]
    assert run.hypervolume(infeasible, prepared) == 0.0


def test_evaluator_traffic_is_what_the_cost_sums(prepared):
    ev = dataclasses.replace(prepared.evaluator, problem="energy_aware_quant_problem")
    genome = [8, 4] * len(ev.input_amax)
    per_layer = ev.traffic(genome)
    assert [t.name for t in ev.shapes] == list(ev.input_amax)
    assert len(per_layer) == len(ev.shapes)
    assert ev.cost(genome) == pytest.approx(sum(t.energy_pj for t in per_layer) / 1e6)
    assert ev.dram_bytes(genome) == pytest.approx(sum(t.total_bits for t in per_layer) / 8)
    assert ev.dram_bytes([16] * len(genome)) > ev.dram_bytes(genome)


def test_results_of_another_workload_refused(workload, tmp_path):
    path = tmp_path / "r.sqlite"
    Store(path, workload.digest(), workload.name).close()
    other = workload.model_copy(update={"bit_weighting": "published"})
    with pytest.raises(StoreMismatch, match="digits_tiny"):
        Store(path, other.digest())


def test_exploration_results_use_the_common_store(workload, tmp_path):
    """The exploration's file is a qlib.store.ResultStore (genome keys, digest as experiment); a
    file that is not a database is refused with its name; a file of the earlier layout (table
    ``evaluations``) is carried over, so an old run still resumes."""
    from qlib.store import ResultStore

    path = tmp_path / "r.sqlite"
    rec = Record(0, (8, 4, 8, 4, 8, 4), (-0.9, 36.0), 0.9, -0.1, 0.5)
    with Store(path, workload.digest(), workload.name) as store:
        store.add(rec)
    with ResultStore(path, workload.digest()) as common:
        assert len(common) == 1 and common.records()[0]["accuracy"] == 0.9
    with Store(path, workload.digest()) as store:
        assert store.get([8, 4, 8, 4, 8, 4]) == rec
    bad = tmp_path / "bad.sqlite"
    bad.write_text("not a database")
    with pytest.raises(StoreError, match="bad.sqlite"):
        Store(bad, workload.digest())
    old = tmp_path / "old.sqlite"
    db = sqlite3.connect(old)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    db.execute(
        "CREATE TABLE evaluations (id INTEGER PRIMARY KEY AUTOINCREMENT, generation INTEGER, "
        "genome TEXT UNIQUE, objectives TEXT, accuracy REAL, constraint_value REAL, seconds REAL, "
        "created REAL)"
    )
    db.execute("INSERT INTO meta VALUES ('workload_digest', ?)", (workload.digest(),))
    db.execute(
        "INSERT INTO evaluations VALUES (1, 0, '[8, 4, 8, 4, 8, 4]', '[-0.9, 36.0]', 0.9, -0.1, "
        "0.5, 0)"
    )
    db.commit()
    db.close()
    with Store(old, workload.digest()) as store:
        assert store.records() == [rec]


def test_bit_weighting():
    assert context.bit_cost([8, 4, 2, 16], "sum") == 30
    assert context.bit_cost([8, 4, 2, 16], "published") == 5 * (8 + 2) + 0.5 * (4 + 16)


def test_weather_seeded_reproducible_and_distinct():
    X, _ = data.load("digits", "test", limit=8)
    outs = {}
    for c in weather.CONDITIONS:
        a = weather.corrupt(X, c, 3, seed=0)
        assert a.shape == X.shape and a.dtype == torch.float32
        assert 0 <= a.min() and a.max() <= 1
        assert torch.equal(a, weather.corrupt(X, c, 3, seed=0))
        outs[c] = a
    assert not torch.equal(
        weather.corrupt(X, "rain", 3, seed=0), weather.corrupt(X, "rain", 3, seed=1)
    )
    conds = list(outs)
    for i, c in enumerate(conds):
        for d in conds[i + 1 :]:
            assert not torch.allclose(outs[c], outs[d]), (c, d)
    assert (weather.corrupt(X, "brightness", 5) - X).mean() > (
        weather.corrupt(X, "brightness", 1) - X
    ).mean()


@pytest.mark.parametrize("condition", weather.CONDITIONS)
def test_weather_damage_grows_with_severity(condition):
    # Mean absolute change of 28 x 28 Fashion-MNIST images must rise from severity 1 to 5.
    X, _ = data.load("fashion-mnist", "test", limit=48)
    change = [
        (weather.corrupt(X, condition, s) - X).abs().mean().item() for s in weather.SEVERITIES
    ]
    assert all(a < b for a, b in zip(change, change[1:], strict=False)), change


def test_linear_traffic_scales_with_bits():
    ref = traffic.LayerTraffic(1600.0, 3200.0, 800.0, 5600.0)
    half = ref.scaled(8, 8, 8)
    assert (half.input_bits, half.weight_bits, half.output_bits) == (800.0, 1600.0, 400.0)
    assert half.energy_pj == pytest.approx(2800.0)
    mixed = ref.scaled(4, 16, 2)
    assert (mixed.input_bits, mixed.weight_bits, mixed.output_bits) == (400.0, 3200.0, 100.0)
    # Output precision of a layer is the next layer's input precision; the last writes 16 bits.
    assert traffic._precisions([4, 8, 6, 2], 2) == [(4, 8, 6), (6, 2, 16)]


def test_zigzag_one_small_conv_and_cache_hit(monkeypatch):
    layer = traffic.LayerShape("c", "conv", C=1, K=4, OY=7, OX=7, FY=3, FX=3, stride=2, padding=1)
    t8 = traffic.zigzag_layer(layer, 8, 8, 8)
    # Outputs are written to DRAM once: 4 x 7 x 7 values at 8 bits, in whole 64-bit words.
    assert t8.output_bits == -(-4 * 7 * 7 * 8 // 64) * 64
    assert t8.weight_bits >= 4 * 9 * 8 and t8.energy_pj > 0
    monkeypatch.setattr(traffic, "_run_zigzag", lambda *a: pytest.fail("cache missed"))
    assert traffic.zigzag_layer(layer, 8, 8, 8) == t8


@pytest.mark.slow
def test_dask_workers_match_serial(prepared):
    """Two LocalCluster workers give the same evaluations as this process (slow: ~20 s start)."""
    genomes = [(8, 8, 4, 4, 6, 6), (2, 16, 3, 3, 8, 2), (16, 16, 16, 16, 16, 16)]
    with Store(":memory:", "s") as store:
        serial = run.CachedEvaluation(prepared.evaluator, store, 0.5)(genomes)
    spec = prepared.workload.parallel.model_copy(update={"mode": "local", "workers": 2})
    with run.dask_client(spec) as client, Store(":memory:", "d") as store:
        parallel = run.CachedEvaluation(prepared.evaluator, store, 0.5, client=client)(genomes)
        assert len(store) == 3
    assert parallel == serial


def _store_with(prepared, genomes) -> Store:
    store = Store(":memory:", prepared.workload.digest())
    run.CachedEvaluation(prepared.evaluator, store, -1.0)(genomes)  # every record feasible
    return store


def test_reevaluate_scores_the_best_records_on_the_reevaluation_data(prepared):
    genomes = [(8, 8, 8, 8, 8, 8), (3, 3, 3, 3, 3, 3), (2, 2, 2, 2, 2, 2)]
    with _store_with(prepared, genomes) as store:
        best = finetune.best(store, 2)
        assert [r.accuracy for r in best] == sorted(
            (r.accuracy for r in store.records()), reverse=True
        )[:2]
        out = finetune.reevaluate(prepared, store, 2)
    # No reevaluation set in the tiny workload: the exploration data, so the same accuracies.
    assert [o.genome for o in out] == [r.genome for r in best]
    assert [o.accuracy for o in out] == [o.exploration_accuracy for o in out]


def test_retrain_recovers_accuracy_of_a_low_bit_individual(prepared):
    low = (2, 2, 2, 2, 2, 2)
    w = prepared.workload
    longer = w.model_copy(update={"retraining": w.retraining.model_copy(update={"epochs": 20})})
    with _store_with(prepared, [low]) as store:
        (out,) = finetune.retrain(dataclasses.replace(prepared, workload=longer), store, 1)
    assert out.genome == low
    # Quantisation-aware fine-tuning through the straight-through estimator must win back a
    # clear part of what 2 bits everywhere lose (measured: 0.58 -> 0.66 on this model).
    assert out.accuracy > out.exploration_accuracy + 0.05
    no_train = prepared.workload.model_copy(
        update={"datasets": prepared.workload.datasets.model_copy(update={"train": None})}
    )
    with _store_with(prepared, [low]) as store, pytest.raises(ValueError, match="datasets.train"):
        finetune.retrain(dataclasses.replace(prepared, workload=no_train), store, 1)
