import subprocess
import sys

import torch

from napari_deepspot2cell.optim import AdamW


def test_matches_torch_adamw_step_by_step():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    b = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    b.load_state_dict(a.state_dict())
    ours = AdamW(a.parameters(), lr=1e-2, weight_decay=1e-2)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=1e-2, foreach=False)
    x, y = torch.rand(16, 5), torch.rand(16, 3)
    for _ in range(25):
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_a_training_step_does_not_load_triton():
    code = (
        "import sys, torch\n"
        "from napari_deepspot2cell.optim import AdamW\n"
        "m = torch.nn.Linear(3, 3); opt = AdamW(m.parameters())\n"
        "m(torch.rand(2, 3)).sum().backward(); opt.step()\n"
        "print('triton._C.libtriton' in sys.modules, 'torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
