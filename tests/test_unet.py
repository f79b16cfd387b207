import numpy as np
import pytest

from biounet.model import backend
from biounet.model.backend import nn
from biounet.model.unet import UNet, valid_input_size


@pytest.mark.parametrize("bilinear,norm", [(False, "batch"), (True, "batch"), (False, "instance")])
@pytest.mark.parametrize("height,width", [(32, 32), (37, 53), (64, 48), (100, 33)])
def test_output_has_the_input_size_for_any_height_and_width(bilinear, norm, height, width):
    model = UNet(n_channels=1, n_classes=2, bilinear=bilinear, base=4, norm=norm).eval()
    with backend.flow.no_grad():
        out = model(backend.to_tensor(np.zeros((2, 1, height, width))))
    assert tuple(out.shape) == (2, 2, height, width)


def test_parameter_names_match_the_original_oneflow_example():
    names = set(UNet(n_channels=1, n_classes=1, bilinear=False).state_dict())
    assert {name.split(".")[0] for name in names} == {
        "inc", "down1", "down2", "down3", "down4", "up1", "up2", "up3", "up4", "outc"}
    for name, shape in [("inc.double_conv.0.weight", (64, 1, 3, 3)),
                        ("down4.maxpool_conv.1.double_conv.0.weight", (1024, 512, 3, 3)),
                        ("up1.up.weight", (1024, 512, 2, 2)),
                        ("up4.conv.double_conv.4.running_var", (64,)),
                        ("outc.conv.weight", (1, 64, 1, 1))]:
        assert tuple(UNet().state_dict()[name].shape) == shape


def test_the_network_has_the_papers_23_convolutional_layers():
    convs = [m for m in UNet().modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert len(convs) == 23


def test_an_input_smaller_than_16_pixels_is_refused_clearly():
    with pytest.raises(ValueError, match="at least 16 pixels a side with batch norm"):
        UNet(base=4)(backend.to_tensor(np.zeros((1, 1, 8, 32))))
    with pytest.raises(ValueError, match="at least 32 pixels a side with instance norm"):
        UNet(base=4, norm="instance")(backend.to_tensor(np.zeros((1, 1, 16, 32))))


def test_odd_and_16_pixel_inputs_work_with_batch_norm():
    model = UNet(base=4).eval()
    with backend.flow.no_grad():
        for shape in [(16, 16), (100, 17)]:
            assert tuple(model(backend.to_tensor(np.zeros((1, 1) + shape))).shape[2:]) == shape


def test_instance_norm_normalizes_each_image_by_itself_and_keeps_no_running_statistics():
    model = UNet(base=4, norm="instance").eval()
    assert not any("running" in name for name in model.state_dict())
    rng = np.random.default_rng(0)
    image = rng.random((1, 1, 32, 32))
    with backend.flow.no_grad():
        alone = backend.to_numpy(model(backend.to_tensor(image)))
        in_batch = backend.to_numpy(model(backend.to_tensor(np.concatenate([image, 5 * rng.random((1, 1, 32, 32))]))))
    np.testing.assert_allclose(in_batch[:1], alone, atol=1e-5)


def test_the_unpadded_network_maps_572_to_388_as_in_the_paper():
    model = UNet(base=2, padding="valid").eval()
    with backend.flow.no_grad():
        assert tuple(model(backend.to_tensor(np.zeros((1, 1, 572, 572)))).shape) == (1, 1, 388, 388)
    assert valid_input_size(388) == 572 and valid_input_size(512) == 700


def test_the_unpadded_network_refuses_sizes_it_cannot_take_clearly():
    with pytest.raises(ValueError, match="16 b \\+ 124"):
        UNet(base=2, padding="valid")(backend.to_tensor(np.zeros((1, 1, 200, 200))))
