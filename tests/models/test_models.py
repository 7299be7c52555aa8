
import pytest
import torch

from trojanguard.errors import ModelLoadError
from trojanguard.models import Normalize, ResNet18, SmallCNN, build_model, load_model, save_model


def test_models_forward_shapes():
    assert SmallCNN(num_classes=7)(torch.rand(2, 3, 32, 32)).shape == (2, 7)
    assert ResNet18(num_classes=10)(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    net = build_model("torchvision:resnet18", num_classes=4, normalize=((0.5,) * 3, (0.25,) * 3))
    assert isinstance(net[0], Normalize) and net.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 4)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("nope")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_state_dict_round_trip(tmp_path, suffix):
    model = SmallCNN().eval()
    path = save_model(model, tmp_path / f"m{suffix}")
    loaded = load_model(path, "small_cnn")
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))
    with pytest.raises(ModelLoadError, match="pass arch="):
        load_model(path)
    with pytest.raises(ModelLoadError, match="does not fit architecture"):
        load_model(path, "resnet18_cifar")


def test_torchscript_and_export_archives(tmp_path):
    model = SmallCNN().eval()
    x = torch.rand(2, 3, 32, 32)
    torch.jit.save(torch.jit.trace(model, x), tmp_path / "m.ts")
    assert torch.allclose(load_model(tmp_path / "m.ts")(x), model(x), atol=1e-5)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    assert torch.allclose(load_model(tmp_path / "m.pt2")(x), model(x), atol=1e-5)


class _Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path(__import__('os').environ['EVIL_MARK']).write_text('ran')",))


def test_pickled_file_is_refused_unless_opted_in(tmp_path, monkeypatch):
    mark = tmp_path / "mark"
    monkeypatch.setenv("EVIL_MARK", str(mark))
    path = tmp_path / "evil.pt"
    torch.save({"w": _Evil()}, path)
    with pytest.raises(ModelLoadError, match="allow_pickle"):
        load_model(path, "small_cnn")
    assert not mark.exists()  # nothing from the file ran
    torch.save(SmallCNN(), tmp_path / "module.pt")
    with pytest.warns(UserWarning, match="arbitrary code"):
        assert isinstance(load_model(tmp_path / "module.pt", allow_pickle=True), SmallCNN)


def test_missing_file():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("/no/such/model.safetensors", "small_cnn")


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18_cifar"])
def test_a_state_dict_without_its_head_loads_as_the_backbone(tmp_path, arch):
    from trojanguard.ssl import BACKBONE_HEADS, build_backbone

    backbone = build_backbone(arch).eval()
    save_model(backbone, tmp_path / "encoder.safetensors")
    loaded = load_model(tmp_path / "encoder.safetensors", arch)
    x = torch.rand(2, 3, 16, 16)
    assert loaded(x).shape == (2, BACKBONE_HEADS[arch][1]) and torch.allclose(loaded(x), backbone(x))
    state = backbone.state_dict()
    state.pop(next(iter(state)))  # a backbone missing another layer still does not fit
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ModelLoadError, match="does not fit architecture"):
        load_model(tmp_path / "broken.pt", arch)
