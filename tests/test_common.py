"""Shared trainer machinery: EMA twin (decay, warm-up, shared tensors), ramp-up, unwrapping."""
import math

import pytest
import torch

from nnunet_partial.trainers.common import EMATwin, schedule_capped_decay, sigmoid_rampup, unwrap


def _unet():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    return PlainConvUNet(1, 3, (4, 8, 16), torch.nn.Conv3d, 3, (1, 2, 2), (2, 2, 2), 3, (2, 2), True,
                         torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU,
                         {"inplace": True}, deep_supervision=True)


def test_every_parameter_decays_once_even_where_nnunet_shares_tensors():
    net = _unet()
    # nnU-Net's decoder holds a reference to the encoder: state_dict lists those tensors twice
    assert len(net.state_dict()) > len(list(net.parameters()))
    twin = EMATwin(net, decay=0.9)
    before = [p.detach().clone() for p in twin.module.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    twin.update(net)
    for b, e, s in zip(before, twin.module.parameters(), net.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * s)
    assert not any(p.requires_grad for p in twin.module.parameters())
    assert not twin.module.training


def test_mean_teacher_warmup_rule():
    net = torch.nn.Linear(2, 2)
    twin = EMATwin(net, decay=0.99, warmup=True)
    decays = []
    for t in range(150):
        decays.append(twin.decay_for_next_update())
        twin.update(net)
    assert decays[:4] == pytest.approx([0.0, 1 / 2, 2 / 3, 3 / 4])  # min(1 - 1/(t+1), a), t = updates before
    assert decays[120] == pytest.approx(0.99) and twin.num_updates == 150
    with torch.no_grad():
        net.weight.add_(1.0)
    first = EMATwin(net, decay=0.99, warmup=True)
    first.update(net)  # the first update copies the student
    torch.testing.assert_close(first.module.weight, net.weight)


def test_state_dict_round_trip():
    net = torch.nn.Linear(3, 2)
    twin = EMATwin(net, 0.9)
    twin.update(net)
    other = EMATwin(torch.nn.Linear(3, 2), 0.9)
    other.load_state_dict(twin.state_dict())
    torch.testing.assert_close(other.module.weight, twin.module.weight)
    assert other.num_updates == 1


def test_sigmoid_rampup():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(1000, 100) == 1.0
    assert sigmoid_rampup(5, 0) == 1.0


def test_unwrap_compiled_module():
    net = torch.nn.Linear(2, 2)
    assert unwrap(torch.compile(net)) is net and unwrap(net) is net


def test_schedule_capped_decay_keeps_the_horizon_within_the_run():
    # horizon 1/(1 - a) <= fraction x steps; long runs keep the requested decay
    assert schedule_capped_decay(0.999, 250_000, 0.05) == 0.999          # nnU-Net's 1000 x 250
    assert schedule_capped_decay(0.999, 20_000, 0.05) == pytest.approx(0.999)
    assert schedule_capped_decay(0.999, 500, 0.05) == pytest.approx(0.96)
    assert 1 / (1 - schedule_capped_decay(0.999, 3000, 0.1)) == pytest.approx(300)
    assert schedule_capped_decay(0.999, 8, 0.05) == 0.0                  # shorter than one horizon: a copy
    assert schedule_capped_decay(0.999, 500, None) == schedule_capped_decay(0.999, 500, 0) == 0.999
