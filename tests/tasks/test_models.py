import pytest
import torch

from eqlosses.tasks.models import CosineClassifier, build_classifier


def test_small_cnn_and_cosine_head():
    model = build_classifier("small_cnn", 7, in_channels=1, width=4, cosine=True)
    assert isinstance(model.fc, CosineClassifier)
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 7) and out.abs().max() <= 30.0 + 1e-4


@pytest.mark.slow
def test_resnet_for_small_grey_images_and_local_pretrained_weights(tmp_path):
    pytest.importorskip("torchvision")
    model = build_classifier("resnet18", 11, in_channels=1, image_size=28)
    out = model(torch.randn(2, 1, 28, 28))
    out.sum().backward()
    assert out.shape == (2, 11)
    # weights saved from a model with another head load into the backbone
    other = build_classifier("resnet18", 5, in_channels=1, image_size=28)
    torch.save(other.state_dict(), tmp_path / "w.pt")
    loaded = build_classifier("resnet18", 11, in_channels=1, image_size=28,
                              pretrained=str(tmp_path / "w.pt"))
    assert torch.equal(loaded.conv1.weight, other.conv1.weight)
    assert loaded.fc.weight.shape == (11, 512)
    with pytest.raises(FileNotFoundError):
        build_classifier("resnet18", 3, pretrained=str(tmp_path / "missing.pt"))
    torch.save({"unrelated": torch.zeros(2)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="no parameter matches"):
        build_classifier("resnet18", 3, pretrained=str(tmp_path / "bad.pt"))
