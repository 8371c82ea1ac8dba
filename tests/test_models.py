import pytest
import torch
from torch import nn

from qlib import data, models, zoo


def test_mlp_has_k_linear_layers_of_width_h():
    net = models.mlp([1, 28, 28], [256] * 3, 10)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [256, 256, 256, 10]
    assert isinstance(net[0], nn.Flatten) and sum(isinstance(m, nn.ReLU) for m in net) == 3
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_cnn_uses_only_supported_layers_and_runs():
    net = models.cnn([1, 28, 28], 10)
    assert {type(m) for m in net} <= {nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear}
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_build_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = models.mlp([1, 8, 8], [16], 10, seed=5)
    after = torch.rand(1)
    b = models.mlp([1, 8, 8], [16], 10, seed=5)
    assert torch.equal(before, after)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_training_learns_digits_and_selects_on_validation():
    X, y = data.load("digits", "train")
    train, val = data.train_val_split(X, y)
    net = models.mlp([1, 8, 8], [32], 10)
    log = models.train(net, train, epochs=20, lr=1e-2, val=val, progress=False)
    assert models.evaluate(net, data.load("digits", "test")) > 0.85
    assert log.best_epoch == max(range(len(log.val_accuracy)), key=log.val_accuracy.__getitem__)
    assert models.evaluate(net, val) == max(log.val_accuracy)  # the best epoch's weights are back
    assert log.loss[-1] < log.loss[0]


def test_checkpoint_roundtrip_needs_no_code(tmp_path):
    net = models.cnn([1, 28, 28], 10, channels=[4, 8], hidden=16, seed=1)
    path = models.save(net, tmp_path / "net.pt", meta={"note": "x"})
    back = models.load(path)
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(net(x), back(x)) and back.arch == net.arch and back.meta == {"note": "x"}


def test_checkpoint_with_other_architecture_is_rejected(tmp_path):
    path = models.save(models.mlp([1, 8, 8], [16], 10), tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"a\.pt holds architecture .* expected"):
        models.load(
            path, arch={"kind": "mlp", "in_shape": [1, 8, 8], "hidden": [32], "classes": 10}
        )
    state = models.mlp([1, 8, 8], [32], 10).state_dict()
    torch.save(
        {"arch": models.mlp([1, 8, 8], [16], 10).arch, "state_dict": state}, tmp_path / "b.pt"
    )
    with pytest.raises(ValueError, match=r"b\.pt: weights do not match"):
        models.load(tmp_path / "b.pt")


def test_missing_or_garbage_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        models.load(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pt"):
        models.load(tmp_path / "junk.pt")
    torch.save({"arch": {"kind": "rnn"}, "state_dict": {}}, tmp_path / "rnn.pt")
    with pytest.raises(ValueError, match="rnn.pt.*kind"):
        models.load(tmp_path / "rnn.pt")


def test_bad_training_data_is_rejected():
    net = models.mlp([1, 8, 8], [4], 10)
    with pytest.raises(ValueError, match="expected X"):
        models.train(net, (torch.zeros(3, 64), torch.zeros(3, dtype=torch.long)), progress=False)
    with pytest.raises(TypeError, match="pair"):
        models.evaluate(net, torch.zeros(3, 1, 8, 8))


def test_zoo_trains_once_then_loads_from_cache(tmp_path):
    a = zoo.get("digits-mlp", epochs=2, train_limit=300, progress=False)
    files = list((tmp_path / "qlib-cache").glob("digits-mlp-*.pt"))
    assert len(files) == 1
    b = zoo.get("digits-mlp", epochs=2, train_limit=300, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    zoo.get("digits-mlp", epochs=3, train_limit=300, progress=False)
    assert len(list((tmp_path / "qlib-cache").glob("digits-mlp-*.pt"))) == 2


def test_zoo_unknown_name_lists_known_ones():
    with pytest.raises(KeyError, match="unknown model 'resnet50'.*mnist-mlp-4x256"):
        zoo.get("resnet50")
    assert len(zoo.names("certification-grid")) == 16
