"""util/run/lars.py: the LARS update."""

import torch

from util.run.lars import LARS


def test_lars_step_matches_the_formula():
    weight = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    bias = torch.nn.Parameter(torch.tensor([1.0]))
    weight.grad, bias.grad = torch.tensor([[0.0, 2.0]]), torch.tensor([0.5])
    optimizer = LARS([weight, bias], lr=0.1, weight_decay=0.5, momentum=0.9, trust_coefficient=0.001)
    optimizer.step()
    update = torch.tensor([[1.5, 4.0]])  # grad + 0.5 * weight
    expected = torch.tensor([[3.0, 4.0]]) - 0.1 * update * (0.001 * 5 / update.norm())
    torch.testing.assert_close(weight.data, expected)
    torch.testing.assert_close(bias.data, torch.tensor([1.0 - 0.1 * 0.5]))  # 1-D: plain SGD, no decay
    bias.grad = torch.tensor([0.5])
    optimizer.step()
    torch.testing.assert_close(bias.data, torch.tensor([0.95 - 0.1 * (0.9 * 0.5 + 0.5)]))  # momentum
